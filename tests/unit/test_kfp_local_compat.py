"""The kfp.local fixes (pipelines/kfp_local_compat.py) and the local run's scope (pipelines/local.py).

Each kfp.local bug is reproduced against *unpatched* kfp.local with a tiny pipeline (SubprocessRunner,
no venv, no pip): those tests fail once the installed kfp has fixed the bug, so the fix gets dropped.

No ``from __future__ import annotations`` here: kfp reads the component's annotations as real types.
"""

import builtins
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from adaptflow.pipelines.kfp_local_compat import FIXES, installed_kfp_version, kfp_local_fixes
from adaptflow.pipelines.local import PipelineFailed, kfp_local_run, run_local
from kfp import dsl
from kfp.local import config as local_config
from kfp.local.orchestrator import orchestrator_utils, task_spec_utils

from adaptflow.steps import ERROR_FILE_ENV

IMAGE = "python:3.11-slim"  # not used by SubprocessRunner(use_venv=False); given to keep kfp quiet


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def make(text: str) -> str:
    return text


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def join(item: str, upstream: str) -> str:
    return f"{item}:{upstream}"


@dsl.pipeline
def loop_with_an_upstream_input() -> list[str]:
    upstream = make(text="upstream")
    with dsl.ParallelFor(items=["a", "b"]) as item:
        joined = join(item=item, upstream=upstream.output)
    return dsl.Collected(joined.output)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def write(text: str, out: dsl.Output[dsl.Artifact]) -> None:
    with open(out.path, "w") as f:
        f.write(text)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def read(art: dsl.Input[dsl.Artifact]) -> str:
    with open(art.path) as f:
        return f.read()


@dsl.pipeline
def oneof_artifact(flag: bool) -> str:
    with dsl.If(flag == True):  # noqa: E712 - a KFP condition, not a Python comparison
        when_true = write(text="if")
    with dsl.Else():
        when_false = write(text="else")
    return read(art=dsl.OneOf(when_true.outputs["out"], when_false.outputs["out"])).output


@dsl.component(base_image="registry.example/adaptflow:1", install_kfp_package=False)
def error_file_seen() -> str:
    import os

    return os.environ.get("ADAPTFLOW_ERROR_FILE", "<unset>")


@dsl.pipeline
def error_file_probe() -> str:
    # a non-Python image and a CPU limit: the two kfp.local warnings kfp_local_run hides
    return error_file_seen().set_cpu_limit("1").output


def _original(owner: Any, name: str) -> Any:
    return vars(owner)[name]


ORIGINALS = {
    "loop_task_outputs": (task_spec_utils, "create_parameter_loop_iteration_task_spec"),
    "oneof_artifacts": (orchestrator_utils.OrchestratorUtils, "get_dag_output_artifacts"),
}


@contextlib.contextmanager
def unpatched_kfp_local(root: Path) -> Iterator[None]:
    """kfp.local as kfp ships it: no adaptflow fix installed, its config put back afterwards."""
    from kfp import local

    for owner, name in ORIGINALS.values():
        function = getattr(_original(owner, name), "__func__", _original(owner, name))
        assert function.__module__.startswith("kfp.local."), f"a fix is still installed on {name}"
    previous_config, previous_print = local_config.LocalExecutionConfig.instance, builtins.print
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        local_config.LocalExecutionConfig.instance = previous_config
        builtins.print = previous_print


def _still_needed(name: str, bug_seen: bool, seen: object) -> None:
    fix = next(f for f in FIXES if f.name == name)
    version = installed_kfp_version()
    if not bug_seen:
        pytest.fail(
            f"kfp fixed this: drop the patch and raise the gate. kfp {version} no longer has the bug the "
            f"{name!r} fix works around (got {seen!r}); delete the fix from pipelines/kfp_local_compat.py "
            f"and require kfp>={version} in pyproject.toml"
        )
    assert fix.applies_to(version), (
        f"kfp {version} still has the bug the {name!r} fix works around, but its gate {fix.needed_by} "
        f"leaves {version} out: widen the gate"
    )


# --------------------------------------------------------------------------- the bugs, unpatched


def test_kfp_local_still_gives_loop_bodies_the_item_for_upstream_outputs(tmp_path: Path) -> None:
    with unpatched_kfp_local(tmp_path):
        got = sorted(loop_with_an_upstream_input().output)
    assert got in (["a:a", "b:b"], ["a:upstream", "b:upstream"]), got  # anything else is a new bug
    _still_needed("loop_task_outputs", got == ["a:a", "b:b"], got)


def test_kfp_local_still_fails_a_oneof_over_artifacts(tmp_path: Path) -> None:
    with unpatched_kfp_local(tmp_path):
        try:
            seen: object = oneof_artifact(flag=True).output
        except ValueError as error:
            seen = str(error)
    _still_needed("oneof_artifacts", "Expected 1 artifact in ArtifactSelectorSpec" in str(seen), seen)


# --------------------------------------------------------------------------- the fixes


def test_loop_bodies_get_the_upstream_output_with_the_fix(tmp_path: Path) -> None:
    with kfp_local_run(tmp_path):
        assert sorted(loop_with_an_upstream_input().output) == ["a:upstream", "b:upstream"]


@pytest.mark.parametrize(("flag", "expected"), [(True, "if"), (False, "else")])
def test_oneof_over_artifacts_takes_the_branch_that_ran_with_the_fix(
    tmp_path: Path, flag: bool, expected: str
) -> None:
    with kfp_local_run(tmp_path):
        assert oneof_artifact(flag=flag).output == expected


def test_fixes_are_installed_for_the_block_only_and_only_where_the_gate_says() -> None:
    originals = {name: _original(*where) for name, where in ORIGINALS.items()}
    with kfp_local_fixes("2.17.3") as applied:
        assert applied == ("loop_task_outputs", "oneof_artifacts")
        assert all(_original(*ORIGINALS[name]) is not originals[name] for name in applied)
        with kfp_local_fixes("2.17.3"):  # nested: the outer fixes come back, then kfp's own
            pass
        assert all(_original(*ORIGINALS[name]) is not originals[name] for name in applied)
    assert {name: _original(*where) for name, where in ORIGINALS.items()} == originals
    with kfp_local_fixes("2.18.0") as applied, kfp_local_fixes("2.16.1") as older:
        assert applied == older == ()
        assert {name: _original(*where) for name, where in ORIGINALS.items()} == originals
    with pytest.raises(RuntimeError), kfp_local_fixes("2.17.0"):
        raise RuntimeError("a failed run")
    assert {name: _original(*where) for name, where in ORIGINALS.items()} == originals


# --------------------------------------------------------------------------- the run's scope


def _process_state() -> dict[str, Any]:
    return {
        "environ": dict(os.environ),
        "warnings.filters": list(warnings.filters),
        "sys.stdout": sys.stdout,
        "builtins.print": builtins.print,
        "kfp.local config": local_config.LocalExecutionConfig.instance,
        "kfp functions": {name: _original(*where) for name, where in ORIGINALS.items()},
    }


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
def test_kfp_local_run_leaves_no_process_state_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    monkeypatch.delenv(ERROR_FILE_ENV, raising=False)
    error_file = tmp_path / "error.json"
    before = _process_state()
    try:
        with kfp_local_run(tmp_path / "root", error_file):
            assert os.environ[ERROR_FILE_ENV] == str(error_file) and sys.stdout is sys.stderr
            assert error_file_probe().output == str(error_file), "components inherit the error file"
            builtins.print = lambda *args, **kwargs: None  # what kfp.local's threaded loops can leave
            if fails:
                raise RuntimeError("stage failed")
    except RuntimeError:
        assert fails
    after = _process_state()
    for key in before:
        assert after[key] == before[key], f"{key} outlived the run"
    assert after["sys.stdout"] is before["sys.stdout"] and after["builtins.print"] is before["builtins.print"]


def test_kfp_local_run_hides_only_kfp_locals_expected_warnings(tmp_path: Path) -> None:
    noise = ("non-Python base image", "no effect in the current local runner")
    with warnings.catch_warnings(record=True) as unfiltered:
        warnings.simplefilter("always")
        with unpatched_kfp_local(tmp_path / "plain"):
            error_file_probe()  # a non-Python image and a CPU limit
    assert all(any(n in str(w.message) for w in unfiltered) for n in noise), "kfp.local warns about both"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with kfp_local_run(tmp_path / "root"):
            error_file_probe()
            warnings.warn("adaptflow's own warnings still show", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in shown]
    assert "adaptflow's own warnings still show" in messages
    assert not [m for m in messages if any(n in m for n in noise)], messages


@pytest.fixture
def embedded_mlflow(tmp_path: Path) -> Iterator[Any]:
    """Settings on an embedded MLflow in tmp_path; the tracking URI mlflow sets for the process undone."""
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    from adaptflow.config import load_settings

    previous = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow_uri._tracking_uri)
    try:
        yield load_settings(None, [f"workdir={tmp_path}", "backbone.weights=none"])
    finally:
        # start_pipeline_run's mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if previous[0] is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous[0]
        mlflow_uri._tracking_uri = previous[1]


def _parent_run(settings: Any) -> Any:
    from mlflow.tracking import MlflowClient

    from adaptflow.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(settings))
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.`adaptflow.data_uri` = 'data'")
    return run


def _data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data`` (relative, as the runs are tagged) with a class folder: it passes the check before a run."""
    (tmp_path / "data" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)


def test_a_failed_local_run_fails_its_mlflow_run_with_the_stage_error(
    embedded_mlflow: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import adaptflow.pipelines.pipeline

    _data_folder(tmp_path, monkeypatch)

    def failing(**arguments: Any) -> Any:
        Path(os.environ[ERROR_FILE_ENV]).write_text(
            json.dumps({"stage": "ingest", "message": "class 'x' is empty", "hint": "remove it"})
        )
        raise RuntimeError("task ingest failed")

    monkeypatch.setattr(adaptflow.pipelines.pipeline, "build_pipeline", lambda settings: failing)
    monkeypatch.delenv(ERROR_FILE_ENV, raising=False)
    stdout = sys.stdout
    with pytest.raises(PipelineFailed, match="stage ingest failed: class 'x' is empty") as error:
        run_local(embedded_mlflow, "data")
    assert error.value.hint == "remove it"
    assert _parent_run(embedded_mlflow).info.status == "FAILED"
    assert _parent_run(embedded_mlflow).info.run_name == f"{embedded_mlflow.registry.model_name}: failed"
    assert ERROR_FILE_ENV not in os.environ and sys.stdout is stdout


def test_an_interrupted_local_run_kills_its_mlflow_run(
    embedded_mlflow: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import adaptflow.pipelines.pipeline

    _data_folder(tmp_path, monkeypatch)

    def interrupted(**arguments: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(adaptflow.pipelines.pipeline, "build_pipeline", lambda settings: interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_local(embedded_mlflow, "data")
    assert _parent_run(embedded_mlflow).info.status == "KILLED"
    assert _parent_run(embedded_mlflow).info.run_name.endswith(": stopped")
