"""Out of memory (simulated CUDA OOM on the CPU): halve the micro-batch, keep the effective batch, go on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptflow.training.loop import fit
from adaptflow.training.memory import OutOfMemory, is_out_of_memory


class _Fits(nn.Module):
    """Raises CUDA's OutOfMemoryError for a forward pass over more than ``limit`` images."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.passes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} images")
        self.passes.append(len(x))
        return self.inner(x)


def _train(limit: int | None) -> tuple[nn.Module, list[int]]:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 3))  # no BatchNorm
    model: nn.Module = inner if limit is None else _Fits(inner, limit)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    train = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    val = DataLoader(data, batch_size=32)
    optimizer = torch.optim.SGD(inner.parameters(), lr=0.1)
    fit(model, train, val, optimizer, epochs=3, patience=3, device=torch.device("cpu"))
    return inner, model.passes if isinstance(model, _Fits) else []


def test_out_of_memory_halves_the_micro_batch_and_the_step_stays_the_full_batchs() -> None:
    reference, _ = _train(limit=None)
    survived, passes = _train(limit=5)
    assert max(passes) == 4  # 16 -> 8 -> 4 images per pass
    assert passes.count(4) >= 4 * 2 * 3  # every training batch as four passes of 4, in all 3 epochs
    # gradient accumulation: the same optimizer steps as whole batches of 16
    for (name, a), (_, b) in zip(reference.state_dict().items(), survived.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_out_of_memory_even_one_image_at_a_time_names_the_stage_and_batch() -> None:
    with pytest.raises(
        OutOfMemory, match=r"train: out of memory on cpu even one image at a time \(batch 16\)"
    ):
        _train(limit=0)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), True),
        (MemoryError(), True),
        (
            RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 9200000000 bytes"
            ),
            True,
        ),
        (RuntimeError("std::bad_alloc"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_what_counts_as_out_of_memory(error: BaseException, expected: bool) -> None:
    assert is_out_of_memory(error) is expected


def test_feature_extraction_halves_its_batch_on_out_of_memory(tiny_baseline, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from adaptflow.data.images import ImageStore
    from adaptflow.training.batches import eval_batches
    from adaptflow.training.candidates import load_candidate
    from adaptflow.training.decoded import decode_split
    from adaptflow.training.features import FeatureCache, extract_features

    base, model = load_candidate(tiny_baseline.candidate_dir)
    entries = tiny_baseline.snapshot.split("train")[:24]
    decoded = decode_split(entries, base.class_names, base.preprocessing, ImageStore())

    def extract(cache: str):  # type: ignore[no-untyped-def]
        cache_dir = FeatureCache(tmp_path / cache, "x")  # a fresh cache: every image goes through the model
        return extract_features(
            model, entries, decoded, eval_batches(base.preprocessing), cache_dir, torch.device("cpu")
        )

    full = extract("a")
    features = model.features

    def tight(x: torch.Tensor) -> torch.Tensor:
        if len(x) > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return features(x)

    model.features = tight  # type: ignore[method-assign]
    halved = extract("b")
    assert halved.computed == len({e.sha256 for e in entries})
    assert torch.allclose(torch.from_numpy(full.features), torch.from_numpy(halved.features), atol=1e-4)
