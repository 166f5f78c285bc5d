"""The literature's direction, checked on split-task digits (bench/evidence.py, issue 5 item 4).

Measured with the converged (L-BFGS) linear probe, see bench/RESULTS.md:
- With few images, transfer beats training from scratch: reproduced (0.770 vs 0.652 in-domain).
- On the in-domain target with few images per class, the advisor keeps the baseline, and no
  fine-tuned model leaves the baseline's 95% interval upwards: reproduced.
- On the shifted target, fine-tuning beats the frozen baseline: NOT reproduced. Inverted + rotated
  digits stay linearly separable in the source features (probe 0.988 vs full fine-tuning 0.971);
  the earlier "win" came from an under-trained probe. It stays an xfail that documents this.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _evidence() -> ModuleType:
    spec = importlib.util.spec_from_file_location("adaptflow_bench_evidence", ROOT / "bench" / "evidence.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ev() -> ModuleType:
    return _evidence()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evidence")


def _by_strategy(rows: list) -> dict:
    return {r.strategy: r for r in rows}


@pytest.mark.slow
@pytest.mark.xfail(
    reason="not reproduced: the converged probe reaches 0.988 on inverted+rotated digits (bench/RESULTS.md)",
    strict=False,
)
def test_shifted_target_fine_tuning_beats_the_frozen_baseline(ev: ModuleType, workdir: Path) -> None:
    rows = _by_strategy(ev.run_condition(ev.Condition("target-shifted", None), workdir, ("full",), epochs=6))
    base, full = rows["baseline"], rows["full"]
    assert full.accuracy > base.accuracy + 0.01, (full.accuracy, base.accuracy)
    assert base.domain_shift is not None


@pytest.mark.slow
def test_few_images_in_domain_keeps_the_baseline(ev: ModuleType, workdir: Path) -> None:
    rows = _by_strategy(ev.run_condition(ev.Condition("target", 10), workdir, ("partial", "full"), epochs=6))
    base = rows["baseline"]
    assert not base.advisor_finetune and "too little data" in base.advisor_reason
    # keeping it costs nothing measurable: no fine-tuned model leaves the baseline's 95% interval upwards
    assert rows["partial"].accuracy <= base.ci[1] and rows["full"].accuracy <= base.ci[1]


@pytest.mark.slow
def test_few_images_transfer_beats_training_from_scratch(ev: ModuleType, workdir: Path) -> None:
    rows = _by_strategy(ev.run_condition(ev.Condition("target", 10), workdir, ("scratch",), epochs=6))
    assert rows["baseline"].accuracy > rows["scratch"].accuracy, (
        rows["baseline"].accuracy,
        rows["scratch"].accuracy,
    )
