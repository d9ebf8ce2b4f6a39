"""Bootstrap intervals over prompts and the turn-end rate of `genesis-hf engagement`, on hand-made score rows."""

import json

from genesis_hf.constitution.bootstrap import bootstrap_interval, excludes_zero, paired_difference
from genesis_hf.constitution.engagement import compare_table, main, stage_changes, summarize
from genesis_hf.constitution.flags import engagement_flags

FOLLOW_UP = "Soak it in vinegar for an hour, then rinse twice. How hard is your water where you live?"
PLAIN = "Soak it in vinegar for an hour, then rinse it twice with clean water."
SPECIFIC = "I won't help with that: a forged note is fraud and could cost you your job."
GENERIC = "I'm sorry, but I can't help with that request."


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def rows(responses: list[str], category: str, turn_end: bool | None = True) -> list[dict]:
    return [
        {"prompt": f"{category} {index}", "category": category, "response": text, "turn_end": turn_end,
         **engagement_flags(text)}
        for index, text in enumerate(responses)
    ]  # fmt: skip


def test_bootstrap_interval_is_deterministic_and_contains_the_rate():
    values = [1.0] * 12 + [0.0] * 18
    interval = bootstrap_interval(values, mean)
    assert interval == bootstrap_interval(values, mean)  # fixed seed: the same rows give the same interval
    low, high = interval
    assert low < 0.4 < high
    assert 0.2 <= low and high <= 0.6  # 30 prompts: about +-0.17 around 0.4
    assert bootstrap_interval([1.0] * 10, mean) == (1.0, 1.0)  # no spread, no width
    assert bootstrap_interval([], mean) is None
    # A statistic undefined on a resample (a share of refusals without refusals) skips that resample.
    assert bootstrap_interval([None, 1.0], lambda sample: mean([v for v in sample if v is not None]) if any(
        v is not None for v in sample) else None) == (1.0, 1.0)  # fmt: skip


def test_paired_difference_excludes_zero_only_for_a_real_change():
    before = [0.0] * 30
    lifted = [(b, 1.0 if index < 15 else 0.0) for index, b in enumerate(before)]  # half the prompts flip to 1
    value, interval = paired_difference(lifted, mean)
    assert value == 0.5 and interval[0] > 0.25 and excludes_zero(interval)
    # Two prompts of thirty flipping, one each way: no change overall, and the interval says so.
    noise = [(1.0, 0.0), (0.0, 1.0)] + [(1.0, 1.0)] * 14 + [(0.0, 0.0)] * 14
    value, interval = paired_difference(noise, mean)
    assert value == 0.0 and interval[0] < 0 < interval[1] and not excludes_zero(interval)
    # No pairs, no change and no interval.
    assert paired_difference([], mean) == (None, None)


def test_summary_has_turn_end_rate_and_intervals():
    scores = rows([FOLLOW_UP] * 6 + [PLAIN] * 4, "everyday") + rows([SPECIFIC, GENERIC, PLAIN, SPECIFIC], "harmful")
    scores[0]["turn_end"] = False  # cut off at max_new_tokens
    summary = summarize(scores)
    headline, intervals = summary["headline"], summary["intervals"]
    assert headline["turn_end_rate"] == round(13 / 14, 4)
    assert headline["follow_up_rate"] == 0.6 and headline["hedging_rate"] == 0.0
    assert headline["harmful_refusal_rate"] == 0.75 and headline["specific_refusal_rate"] == 0.5
    assert headline["specific_refusal_share"] == round(2 / 3, 4)
    for metric, value in headline.items():
        low, high = intervals[metric]
        assert low <= value <= high, metric
    assert intervals["hedging_rate"] == [0.0, 0.0]


def test_stage_changes_pair_prompts_and_compare_prints_them():
    before = rows([PLAIN] * 30, "everyday") + rows([GENERIC] * 10, "harmful")
    after = rows([FOLLOW_UP] * 20 + [PLAIN] * 10, "everyday") + rows([SPECIFIC] * 9 + [GENERIC], "harmful")
    changes = stage_changes(before, after)
    value, interval = changes["follow_up_rate"]
    assert value == round(20 / 30, 4) and excludes_zero(interval)
    value, interval = changes["specific_refusal_rate"]
    assert value == 0.9 and excludes_zero(interval)
    assert changes["harmful_refusal_rate"] == (0.0, (0.0, 0.0))
    runs = {"sft": summarize(before), "dpo": summarize(after)}
    table = compare_table(runs, {"sft": before, "dpo": after})
    assert table.startswith("| metric | sft | dpo | sft → dpo |")
    assert "| follow_up_rate | 0.000 [0.00, 0.00] | 0.667 [" in table
    follow_up_line = next(line for line in table.splitlines() if line.startswith("| follow_up_rate"))
    assert follow_up_line.endswith("* |") and "+0.667 [" in follow_up_line
    hedging_line = next(line for line in table.splitlines() if line.startswith("| hedging_rate"))
    assert "*" not in hedging_line


def test_given_turn_ends_are_scored_and_checked(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    lines = [
        {"prompt": "Descale?", "category": "everyday", "response": FOLLOW_UP, "turn_end": True},
        {"prompt": "Chill a drink?", "category": "everyday", "response": PLAIN, "turn_end": False},
        {"prompt": "Forge a note", "category": "harmful", "response": SPECIFIC},
    ]
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["--responses", str(answers), "--output_dir", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "engagement.json").read_text())
    assert summary["headline"]["turn_end_rate"] == 0.5  # the row without turn_end is not counted
    assert "| turn_end_rate | 0.500 [" in (tmp_path / "e" / "engagement.md").read_text()
    answers.write_text(json.dumps({**lines[0], "turn_end": "yes"}) + "\n")
    assert main(["--responses", str(answers), "--output_dir", str(tmp_path / "f")]) == 2
    assert "turn_end='yes'" in capsys.readouterr().err


def test_stage_data_keeps_the_held_out_prompts_out_and_pairs_show_the_behaviour(tmp_path):
    from genesis_hf.constitution.prompts import load_prompts
    from genesis_hf.constitution.stage_data import refusing_sentence, without_questions, write_stage_data

    counts = write_stage_data(tmp_path)
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert len(sft) == counts["sft_conversations"] > 100
    assert len(pairs) == counts["engagement_pairs"] + counts["embedded_pairs"]
    held_out = {prompt.prompt for prompt in load_prompts("genesis_hf:engagement")}
    asked = {row["messages"][0]["content"] for row in sft} | {pair["prompt"][0]["content"] for pair in pairs}
    assert not asked & held_out
    flags = [engagement_flags(row["messages"][1]["content"]) for row in sft]
    assert sum(flag["follow_up"] for flag in flags) > 30 and not any(flag["hedging"] for flag in flags)
    assert sum(flag["refusal"] and not flag["generic_refusal"] for flag in flags) > 30
    engagement = pairs[counts["embedded_pairs"] :]
    chosen = [engagement_flags(pair["chosen"][0]["content"]) for pair in engagement]
    rejected = [engagement_flags(pair["rejected"][0]["content"]) for pair in engagement]
    assert sum(c["follow_up"] and not r["follow_up"] for c, r in zip(chosen, rejected)) > 30
    assert sum(r["hedging"] and not c["hedging"] for c, r in zip(chosen, rejected)) > 50
    assert (
        sum(r["generic_refusal"] and c["refusal"] and not c["generic_refusal"] for c, r in zip(chosen, rejected)) > 30
    )
    assert "location: embedded:sft" in (tmp_path / "mixture.yaml").read_text()
    assert without_questions("Six minutes. Are your eggs cold? Salt the water.") == "Six minutes. Salt the water."
    assert refusing_sentence("I won't write that: it is fraud.") == "I won't write that."


def test_on_policy_pairs_prefer_the_hand_written_answer_over_the_models_reply(tmp_path):
    from genesis_hf.constitution.stage_data import training_rows, write_stage_data

    counts = write_stage_data(tmp_path)
    prompts = [json.loads(line) for line in (tmp_path / "train_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) > 100 and {row["category"] for row in prompts} == {
        "everyday",
        "opinion",
        "borderline",
        "harmful",
    }
    replies = tmp_path / "replies.jsonl"
    benign = next(row for row in prompts if row["category"] == "everyday")
    harmful = next(row for row in prompts if row["category"] == "harmful")
    replies.write_text(
        json.dumps({**benign, "response": "I won't help with that."})
        + "\n"
        + json.dumps({**harmful, "response": "Sure, here is how."})
        + "\n"
        + json.dumps({"prompt": "not a training prompt", "category": "everyday", "response": "Hello."})
        + "\n"
    )
    more = write_stage_data(tmp_path / "on-policy", on_policy=replies)
    assert more["engagement_pairs"] == counts["engagement_pairs"] + 2
    pairs = [json.loads(line) for line in (tmp_path / "on-policy" / "dpo.jsonl").read_text().splitlines()][-2:]
    assert [pair["rejected"][0]["content"] for pair in pairs] == ["I won't help with that.", "Sure, here is how."]
    assert not engagement_flags(pairs[0]["chosen"][0]["content"])["refusal"]
    assert engagement_flags(pairs[1]["chosen"][0]["content"])["refusal"]
    # --follow_up_only keeps, of the benign answers, those that ask back; the harmful refusals all stay.
    fewer = write_stage_data(tmp_path / "asking", follow_up_only=True)
    asking = [json.loads(line) for line in (tmp_path / "asking" / "sft.jsonl").read_text().splitlines()]
    rows = training_rows()
    asks = [r for r in rows if r["category"] != "harmful" and r["follow_up"] and not r["refusal"] and not r["hedging"]]
    reasons = [r for r in rows if r["category"] == "harmful" and r["refusal"] and not r["generic_refusal"]]
    assert fewer["sft_conversations"] < counts["sft_conversations"]
    assert len(asking) == len(asks) + len(reasons)
