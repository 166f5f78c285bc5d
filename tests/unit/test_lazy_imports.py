"""A stage process imports only what its stage uses (issue 12, orchestration cost; bench/overhead.py).

Every check runs in a fresh interpreter, so what this test process has already imported hides nothing.
The stages' entry modules (``adaptflow.steps`` and the components) import no heavy package; a step
that does not use torch (ingest, register, report_unchanged, compare_report) never imports it, not
even for the thread settings; a component process skips the interpreter's final garbage collection.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import adaptflow.steps

HEAVY = {"torch", "torchvision", "mlflow", "sqlalchemy", "onnx", "onnxruntime", "matplotlib", "sklearn"}
HEAVY |= {"scipy", "pandas"}
TORCH = {"torch", "torchvision"}


def loaded_after(code: str) -> set[str]:
    """The top-level packages loaded once ``code`` has run in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {name.split(".")[0] for name in json.loads(done.stdout.strip().splitlines()[-1])}


def step_imports() -> dict[str, tuple[list[str], bool | None]]:
    """Each ``*_step`` -> (the modules its body imports, its ``uses_torch`` argument, if it passes one)."""
    tree = ast.parse(Path(adaptflow.steps.__file__).read_text())
    found: dict[str, tuple[list[str], bool | None]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name.endswith("_step")):
            continue
        modules = [n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.module]
        uses_torch = [
            bool(kw.value.value)
            for n in ast.walk(node)
            if isinstance(n, ast.Call)
            for kw in n.keywords
            if kw.arg == "uses_torch" and isinstance(kw.value, ast.Constant)
        ]
        found[node.name] = (sorted(set(modules)), uses_torch[0] if uses_torch else None)
    return found


def test_the_stage_entry_modules_import_nothing_heavy() -> None:
    loaded = loaded_after(
        "import adaptflow.steps, adaptflow.components.pipeline, adaptflow.components.compare"
    )
    assert loaded & HEAVY == set()


def test_every_step_says_whether_it_uses_torch() -> None:
    steps = step_imports()
    assert {"ingest_step", "register_step", "finetune_step"} <= set(steps)
    undecided = [name for name, (_, uses) in steps.items() if uses is None and name != "keep_baseline_step"]
    assert undecided == []
    assert not steps["ingest_step"][1] and not steps["register_step"][1]
    assert steps["baseline_step"][1] and steps["finetune_step"][1]


@pytest.mark.parametrize(
    "step", [name for name, (_, uses) in step_imports().items() if not uses and name != "keep_baseline_step"]
)
def test_a_step_without_torch_imports_no_torch(step: str) -> None:
    modules, _ = step_imports()[step]
    loaded = loaded_after("\n".join(["import adaptflow.steps", *(f"import {m}" for m in modules)]))
    assert loaded & TORCH == set(), f"{step} imports {sorted(loaded & TORCH)} through {modules}"


def test_the_ingest_stage_runs_without_torch(tmp_path: Path) -> None:
    """The whole ingest step, its MLflow runs included, in a fresh process: torch is never loaded."""
    from adaptflow.config import load_settings
    from adaptflow.data.demo import write_demo_data

    data = write_demo_data(tmp_path / "data", size=32, limit_per_class=6)
    settings = load_settings(overrides=[f"workdir={tmp_path / 'work'}"])
    config = tmp_path / "config.json"
    config.write_text(settings.to_json())
    code = (
        "from adaptflow.steps import ingest_step\n"
        f"out = ingest_step({str(data.target)!r}, {str(config)!r}, '', {str(tmp_path / 'snap')!r})\n"
        "assert out.fingerprint"
    )
    loaded = loaded_after(code)
    assert "mlflow" in loaded  # it did track
    assert loaded & (TORCH | {"matplotlib", "onnxruntime"}) == set()


FREEZE = """
import gc, types, sys
from adaptflow.steps import reports_errors
{setup}
reports_errors("probe")(lambda: None)()
print(gc.get_freeze_count() > 0)
"""


@pytest.mark.parametrize("component_process", [True, False])
def test_only_a_component_process_skips_the_final_collection(component_process: bool) -> None:
    # a KFP component process runs `python -m kfp.dsl.executor_main`
    setup = "sys.modules['__main__'].__spec__ = types.SimpleNamespace(name='kfp.dsl.executor_main')"
    code = FREEZE.format(setup=setup if component_process else "")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split()[-1] == str(component_process)
