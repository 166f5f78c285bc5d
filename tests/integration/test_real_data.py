"""bench/real_data.py, reduced: the Fashion-MNIST split task at one size and one seed (issue 9, item 2).

Small pretraining (1 epoch on 300 source images per class) keeps it to a few minutes on a CPU; the
numbers are not the benchmark's, the plumbing is: the same official test images for every method,
the registered adaptflow model scored through ``adaptflow predict``, references that beat chance.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from bench_modules import load_bench
from services import require_or_skip


@pytest.fixture(scope="module")
def rd() -> ModuleType:
    module = load_bench("real_data")
    try:
        module.find_dataset_dir()
    except module.DatasetMissing as error:
        require_or_skip(f"Fashion-MNIST is not installed ({error})")
    return module


def test_idx_reader_and_draw(rd: ModuleType) -> None:
    images, labels = rd.load_split(rd.find_dataset_dir(), "t10k")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels)) == list(range(10))
    small, large = rd.draw(labels, 10, seed=0), rd.draw(labels, 50, seed=0)
    assert set(small) <= set(large)  # nested draws
    assert np.array_equal(small, rd.draw(labels, 10, seed=0))
    assert not np.array_equal(small, rd.draw(labels, 10, seed=1))
    assert sorted(np.unique(labels[small], return_counts=True)[1]) == [10] * 5
    assert set(labels[large]) == set(rd.TARGET_CLASSES)


@pytest.mark.slow
@pytest.mark.integration
def test_reduced_benchmark(rd: ModuleType, tmp_path: Path) -> None:
    bench = rd.run_bench(tmp_path, sizes=[50], seeds=1, pretrain_epochs=1, source_per_class=300)
    scores = {s.method: s for s in bench.scores}
    assert set(scores) == set(rd.METHODS)
    assert bench.n_test == 5000  # the official t10k images of classes 5-9
    assert {s.n_test for s in bench.scores} == {bench.n_test}, "every method on the same test images"
    for s in bench.scores:
        assert 0.0 <= s.accuracy <= 1.0 and (s.size, s.seed) == (50, 0)
    for method in rd.ADAPTFLOW_METHODS:
        assert scores[method].version is not None, f"{method}: no registered version"
        assert scores[method].promoted is not None
    assert scores["linear probe"].winner == "baseline"
    assert scores["logreg"].accuracy > 0.5, "pixel logistic regression far above chance (0.2)"
    assert scores["adaptflow"].accuracy > 0.4
    # the target ImageFolder holds exactly the drawn training images, and the test tree the official ones
    target = tmp_path / "target-n50-seed0"
    assert len(rd.tree_files(target)) == 250
    assert len(rd.tree_files(tmp_path / "test")) == 5000
    section = rd.markdown(bench, "python bench/real_data.py --sizes 50 --seeds 1", 1.0, [50], 1, "test")
    assert section.startswith(rd.HEADING) and "partial run" in section
    assert "beat every reference" in section
    # a resumed run keeps every finished condition from scores.jsonl instead of training again
    again = rd.run_bench(tmp_path, sizes=[50], seeds=1, pretrain_epochs=1, source_per_class=300, resume=True)
    assert again.kept == [(50, 0)] and again.scores == bench.scores
