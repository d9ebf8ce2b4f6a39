"""The one config idiom: dataclasses, `--config file.yaml` for defaults, CLI flags override, unknown keys rejected."""

from dataclasses import dataclass

import pytest
import yaml

from genesis_hf.args import ConfigError, parse_args


@dataclass
class RunArguments:
    learning_rate: float = 1e-4
    max_steps: int = 10
    output_dir: str = "outputs/run"


@dataclass
class ModelArguments:
    model_preset: str = "genesis-tiny"


def write_yaml(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_gives_defaults_and_cli_overrides(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"learning_rate": 3e-4, "max_steps": 5, "model_preset": "debug"})
    run, model = parse_args((RunArguments, ModelArguments), ["--config", config, "--max_steps", "7"])
    assert run == RunArguments(learning_rate=3e-4, max_steps=7)
    assert model == ModelArguments(model_preset="debug")


def test_no_config_uses_dataclass_defaults():
    (run,) = parse_args((RunArguments,), [])
    assert run == RunArguments()


def test_unknown_yaml_key_names_valid_keys_and_closest_match(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"learning_rte": 3e-4})
    with pytest.raises(ConfigError) as error:
        parse_args((RunArguments, ModelArguments), ["--config", config])
    message = str(error.value)
    assert "'learning_rte' (did you mean 'learning_rate'?)" in message
    assert "learning_rate, max_steps, model_preset, output_dir" in message


def test_unknown_cli_flag_is_an_error_listing_valid_flags():
    with pytest.raises(ConfigError, match=r"Unknown command-line argument\(s\) \['--bogus', '1'\].*--max_steps"):
        parse_args((RunArguments,), ["--bogus", "1"])


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args((RunArguments,), ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_args((RunArguments,), ["--config", str(bad)])


# ---------------------------------------------------------------------------------------------------------------------
# The same idiom for the genesis-hf subcommands (SubcommandParser)


def parse_subcommand(argv: list[str]):
    from genesis_hf import cli

    return cli.build_parser().parse_args(argv)


def test_subcommand_config_gives_defaults_flags_override_and_snake_or_kebab_spelling(tmp_path):
    config = write_yaml(tmp_path / "export.yaml", {"max_shard_size": "5MB", "dtype": "fp32"})
    args = parse_subcommand(["export", "ckpt", "out", "--config", config])
    assert (args.max_shard_size, args.dtype, args.checkpoint) == ("5MB", "fp32", "ckpt")
    args = parse_subcommand(["export", "ckpt", "out", "--config", config, "--max-shard-size", "7MB"])
    assert (args.max_shard_size, args.dtype) == ("7MB", "fp32")
    assert parse_subcommand(["export", "ckpt", "out", "--max_shard_size", "9MB"]).max_shard_size == "9MB"
    # A required option may come from the file (genesis-hf report --output_dir).
    args = parse_subcommand(["report", "a.json", "--config", write_yaml(tmp_path / "r.yaml", {"output_dir": "rep"})])
    assert args.output_dir == "rep"
    # Nested subcommands: the file belongs to the innermost one.
    config = write_yaml(tmp_path / "tok.yaml", {"vocab_size": 640})
    assert parse_subcommand(["tokenizer", "train", "--config", config, "--output_dir", "t"]).vocab_size == 640


def test_subcommand_config_with_an_unknown_key_is_a_one_line_error(tmp_path, capsys):
    from genesis_hf import cli

    config = write_yaml(tmp_path / "export.yaml", {"max_shard_sise": "5MB"})
    assert cli.main(["export", "ckpt", "out", "--config", config]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "'max_shard_sise' (did you mean 'max_shard_size'?)" in error and "Valid keys are:" in error


def test_subcommand_flags_are_not_abbreviated():
    with pytest.raises(SystemExit):
        parse_subcommand(["export", "ckpt", "out", "--max_shard", "5MB"])
