"""The package reads as the pipeline (docs/architecture.md): imports point one way, from later stages to earlier ones.

Every `import` of the package is checked, function-level ones included, and the pretraining loop is imported in a
fresh interpreter to see what it really loads.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "genesis_hf"
# Shared by every stage; they import no stage (the package root registers the model classes, stage 1).
# writer_lock: every stage that writes a folder takes it first (one writer per folder).
FOUNDATION = ("layout", "args", "events", "corpus", "writer_lock")
STAGES = ("model", "tokenizer", "data", "pretrain", "posttrain", "constitution", "evaluate", "publish", "playground")
# Not stages: the console script dispatches to every stage (lazily); the test helpers may use anything.
OUTSIDE_THE_PIPELINE = ("cli", "testing")
# Package data that happens to be Python: the Space's app.py runs inside the Space, not as part of genesis_hf.
NOT_MODULES = ("publish/space_template",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if not any(path.relative_to(PACKAGE_DIR).as_posix().startswith(prefix) for prefix in NOT_MODULES)
    }


def imported_modules(name: str, path: Path) -> set[str]:
    """Every genesis_hf module `path` imports, wherever the import statement is."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            # `from genesis_hf.pretrain import checkpoint` imports the submodule too.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {item for item in found if item == "genesis_hf" or item.startswith("genesis_hf.")}


def stage_of(module: str) -> int | str:
    """0 for the foundation, 1-9 for the stages in pipeline order; the root package is the model stage."""
    parts = module.split(".")
    if len(parts) == 1:
        return 1
    top = parts[1]
    if top in FOUNDATION:
        return 0
    if top in STAGES:
        return STAGES.index(top) + 1
    if top in OUTSIDE_THE_PIPELINE:
        return top
    raise AssertionError(f"{module} belongs to no stage: add it to a stage folder or to FOUNDATION in this test")


def test_every_module_belongs_to_a_stage_and_imports_point_one_way():
    modules = package_modules()
    assert len(modules) > 40  # the walk found the package
    violations = []
    for name, path in modules.items():
        stage = stage_of(name)
        if stage in OUTSIDE_THE_PIPELINE:
            continue
        for imported in imported_modules(name, path):
            if imported not in modules:  # a name imported from a module, e.g. `from genesis_hf import GenesisConfig`
                continue
            target = stage_of(imported)
            if target == "testing" or target == "cli" or target > stage:
                violations.append(f"{name} (stage {stage}) imports {imported} (stage {target})")
    assert violations == [], "\n".join(violations)


def test_publishing_does_not_reach_into_a_training_loop():
    loops = {"genesis_hf.pretrain.trainer", "genesis_hf.posttrain.outputs"}
    modules = package_modules()
    reaching = [
        f"{name} imports {imported}"
        for name, path in modules.items()
        if name.startswith(("genesis_hf.publish", "genesis_hf.evaluate", "genesis_hf.playground"))
        for imported in imported_modules(name, path) & loops
    ]
    assert reaching == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    # The check above must not pass by missing imports hidden in functions or written relative to the package.
    path = PACKAGE_DIR / "pretrain" / "trainer.py"
    found = imported_modules("genesis_hf.pretrain.trainer", path)
    assert {"genesis_hf.pretrain.checkpoint", "genesis_hf.pretrain.final", "genesis_hf.events"} <= found
    assert "genesis_hf.pretrain.flops" in found  # imported inside setup_run
    assert stage_of("genesis_hf.publish.push") > stage_of("genesis_hf.pretrain.trainer") > stage_of("genesis_hf.data")


@pytest.mark.parametrize(
    ("entry", "forbidden"),
    [
        ("genesis_hf.pretrain.trainer", ("genesis_hf.publish", "genesis_hf.playground", "genesis_hf.evaluate")),
        ("genesis_hf.posttrain.outputs", ("genesis_hf.publish", "genesis_hf.playground", "genesis_hf.evaluate")),
        ("genesis_hf.model.folder", ("genesis_hf.pretrain", "genesis_hf.publish", "genesis_hf.tokenizer")),
        ("genesis_hf.data.loader", ("genesis_hf.pretrain", "genesis_hf.posttrain", "genesis_hf.publish")),
    ],
)
def test_importing_a_stage_loads_no_later_stage(entry, forbidden):
    code = (
        f"import sys, json, {entry}\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.startswith('genesis_hf'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert entry in loaded
    assert [name for name in loaded if name.startswith(forbidden)] == []
