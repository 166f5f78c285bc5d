"""OpenMP's bounded spin (issue 12): the default, a user's own setting winning, and where it is applied."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from adaptflow.pipelines.local_process import stage_env

from adaptflow.cpus import OPENMP_ENV, openmp_env, use_openmp_defaults
from bench_modules import load_bench


def test_openmp_env_adds_the_bounded_spin_when_unset() -> None:
    assert OPENMP_ENV == {"GOMP_SPINCOUNT": "10000"}
    assert openmp_env({"PATH": "/bin"}) == OPENMP_ENV


@pytest.mark.parametrize("user", [{"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "PASSIVE"}])
def test_a_users_openmp_setting_wins(user: dict[str, str]) -> None:
    # a spin count outranks the wait policy in libgomp, so adding one would undo a user's PASSIVE
    assert openmp_env(user) == {}


def test_stage_processes_get_the_bounded_spin() -> None:
    env = stage_env({"PATH": "/bin"}, {"KFP_VAR": "1"})
    assert env["GOMP_SPINCOUNT"] == "10000"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["KFP_VAR"] == "1" and env["PATH"] == "/bin"


def test_stage_processes_keep_a_users_setting() -> None:
    assert "GOMP_SPINCOUNT" not in stage_env({"OMP_WAIT_POLICY": "PASSIVE"})
    assert stage_env({}, {"GOMP_SPINCOUNT": "50"})["GOMP_SPINCOUNT"] == "50"


def test_use_openmp_defaults_only_before_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(key, "")  # so that teardown restores the environment the test changes
        monkeypatch.delenv(key)
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or object())  # type: ignore[arg-type]
    assert use_openmp_defaults() == {}  # too late: libgomp has read its settings
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    assert use_openmp_defaults() == OPENMP_ENV
    assert os.environ["GOMP_SPINCOUNT"] == "10000"


def test_the_cli_sets_the_spin_before_torch_loads() -> None:
    # a fresh process, as the console script starts: importing the CLI must not load torch, or
    # main() would set the variable after libgomp had read it
    code = (
        "import os, sys\n"
        "from adaptflow import cli\n"
        "assert 'torch' not in sys.modules, 'importing adaptflow.cli loaded torch'\n"
        "sys.argv = ['adaptflow', '--version']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "10000"


def test_contention_bench_compares_default_and_adaptflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own setting reaches neither side
    envs = load_bench("contention").environments()
    default, ours = envs["torch/libgomp default env"], envs["adaptflow"]
    assert "GOMP_SPINCOUNT" not in default and "OMP_WAIT_POLICY" not in default
    assert ours["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in ours
