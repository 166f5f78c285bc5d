"""The training data path: decoded uint8 cache, batch loader, batch transform, and the loop's host reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from adaptflow.contracts import Preprocessing
from adaptflow.data.images import ImageStore, eval_transform
from adaptflow.training.batches import BatchTransform, decoded_loader, eval_batches, eval_loader
from adaptflow.training.decoded import DecodedImages, decode_split
from adaptflow.training.loop import fit

PRE = Preprocessing(input_size=24, resize_size=28, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))


class CountingStore(ImageStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self, entry):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().read(entry)


@pytest.fixture(scope="module")
def entries(tiny_baseline):  # type: ignore[no-untyped-def]
    return tiny_baseline.snapshot.split("train")[:40], tiny_baseline.snapshot.class_names


def test_decoded_images_match_the_per_image_host_transform(entries) -> None:  # type: ignore[no-untyped-def]
    train, classes = entries
    store = ImageStore()
    decoded = decode_split(train, classes, PRE, store)
    assert decoded.images.dtype == torch.uint8 and decoded.images.shape == (len(train), 3, 24, 24)
    on_host = torch.stack([eval_transform(PRE)(store.image(e)) for e in train])
    # the same operations in the same order: the model sees what predict and the ONNX export see
    assert torch.allclose(eval_batches(PRE)(decoded.images), on_host, atol=1e-6)
    assert decoded.labels.tolist() == [classes.index(e.label) for e in train]


def test_decoded_cache_is_written_once_and_reused(entries, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train, classes = entries
    first_store, second_store = CountingStore(), CountingStore()
    first = decode_split(train, classes, PRE, first_store, tmp_path)
    assert first_store.reads == len(train)
    (written,) = list(tmp_path.rglob("*.npy"))
    second = decode_split(train, classes, PRE, second_store, tmp_path)
    assert second_store.reads == 0  # another stage (process) reads the file, not the images
    assert torch.equal(first.images, second.images) and not second.memory_mapped
    mapped = decode_split(train, classes, PRE, CountingStore(), tmp_path, memory_limit=1)
    assert mapped.memory_mapped and torch.equal(mapped.images, first.images)
    # other preprocessing is another cache entry; a broken file is decoded again
    decode_split(train, classes, PRE.model_copy(update={"input_size": 20}), CountingStore(), tmp_path)
    assert len(list(tmp_path.rglob("*.npy"))) == 2
    written.write_bytes(b"not an array")
    again = CountingStore()
    assert torch.equal(decode_split(train, classes, PRE, again, tmp_path).images, first.images)
    assert again.reads == len(train)


def test_worker_processes_decode_the_same_pixels_and_raise_one_clear_error(tiny_baseline) -> None:  # type: ignore[no-untyped-def]
    from adaptflow.errors import DataError
    from adaptflow.training import decoded as decoded_module

    train = tiny_baseline.snapshot.split("train")
    chunk = max(4, len(train) // 4)  # several chunks, so several worker processes
    in_process = decoded_module.decode_all(train, PRE, ImageStore(), workers=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoded_module, "CHUNK", chunk)
        assert torch.equal(
            torch.from_numpy(decoded_module.decode_all(train, PRE, ImageStore(), workers=2)),
            torch.from_numpy(in_process),
        )
        # a file that changed after ingest, read in a worker: the parent raises the store's own error
        changed = train[-1].model_copy(update={"sha256": "0" * 64})
        with pytest.raises(DataError) as raised:
            decoded_module.decode_all([*train[:-1], changed], PRE, ImageStore(), workers=2)
    assert "changed after ingest" in raised.value.message and raised.value.hint
    assert "Traceback" not in str(raised.value)


def test_feature_cache_shards_serve_what_was_put_and_skip_broken_ones(tmp_path: Path) -> None:
    import numpy as np

    from adaptflow.training.features import FeatureCache

    cache = FeatureCache(tmp_path, "ns")
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.put(["a", "b", "c"], vectors)
    cache.put(["d"], vectors[:1] + 100)
    fresh = FeatureCache(tmp_path, "ns")  # another process: reads the shards from disk
    assert fresh.images() == {"a", "b", "c", "d"}
    found = fresh.lookup(["c", "a", "x", "d"])
    assert set(found) == {"a", "c", "d"}
    assert np.array_equal(found["c"], vectors[2]) and np.array_equal(found["d"], vectors[0] + 100)
    assert len(list((tmp_path / "ns" / "shards").iterdir())) == 4  # two files per shard, not per image
    (features,) = [p for p in (tmp_path / "ns" / "shards").glob("*.features.npy") if np.load(p).shape[0] == 3]
    features.write_bytes(b"broken")
    assert set(FeatureCache(tmp_path, "ns").lookup(["a", "d"])) == {"d"}  # a broken shard is a miss


def test_loader_batches_are_deterministic_and_memory_mapped_ones_use_workers(entries, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train, classes = entries
    decoded = decode_split(train, classes, PRE, ImageStore())
    order = [
        torch.cat([y for _, y in decoded_loader(decoded, batch_size=8, shuffle=True, seed=3)]) for _ in "ab"
    ]
    assert torch.equal(order[0], order[1]) and sorted(order[0].tolist()) == sorted(decoded.labels.tolist())
    x, y = next(iter(eval_loader(decoded, batch_size=16)))
    assert (
        x.dtype == torch.uint8 and torch.equal(x, decoded.images[:16]) and torch.equal(y, decoded.labels[:16])
    )
    assert eval_loader(decoded).num_workers == 0  # in memory: a batch is one indexing op
    shutil.rmtree(tmp_path, ignore_errors=True)
    mapped = decode_split(train, classes, PRE, ImageStore(), tmp_path, memory_limit=1)
    assert decoded_loader(mapped, batch_size=8, shuffle=True).num_workers >= 1
    assert decoded_loader(mapped, batch_size=8, shuffle=True, num_workers=0).num_workers == 0  # config wins


def test_augmentation_is_per_image_and_follows_the_seed(entries) -> None:  # type: ignore[no-untyped-def]
    train, classes = entries
    decoded = decode_split(train, classes, PRE, ImageStore())
    same = decoded.images[:1].repeat(8, 1, 1, 1)
    augment = BatchTransform(PRE, augment=True).train()
    torch.manual_seed(0)
    a = augment(same)
    assert len({tuple(v.flatten()[:200].tolist()) for v in a}) == 8  # 8 copies, 8 different draws
    torch.manual_seed(0)
    assert torch.equal(augment(same), a)
    assert torch.equal(augment.eval()(same), eval_batches(PRE)(same))  # eval mode: no augmentation


def _tiny_fit(
    batches: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[int] | None = None, **options
) -> tuple[nn.Module, object]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))
    if sizes is not None:  # the batch size of every forward pass in training mode
        model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])) if m.training else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = fit(
        model, batches, batches[:1], optimizer, epochs=2, patience=5, device=torch.device("cpu"), **options
    )
    return model, result


def _batches(steps: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 3, (size,), generator=g))
        for _ in range(steps)
    ]


def test_gradient_accumulation_takes_the_whole_batchs_step() -> None:
    batches = _batches(4)
    whole, _ = _tiny_fit(batches)
    loader_like = _Loader(batches, batch_size=8)
    sizes: list[int] = []
    split, _ = _tiny_fit(loader_like, sizes, accumulation_steps=4)
    assert set(sizes) == {2}  # 4 passes of 2 images per step
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


class _Loader(list):  # type: ignore[type-arg]
    """A list of batches with the DataLoader attribute fit reads for accumulation."""

    def __init__(self, batches: list, batch_size: int) -> None:  # type: ignore[type-arg]
        super().__init__(batches)
        self.batch_size = batch_size


def test_the_loop_reads_the_device_once_per_step_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and correct counts stay on the device; the one read per step is the divergence guard."""
    reads = {"n": 0}
    for name in ("__float__", "__int__", "__bool__", "item"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original):  # type: ignore[no-untyped-def]
            reads["n"] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    counts = []
    for steps in (5, 15):
        reads["n"] = 0
        _tiny_fit(_batches(steps))
        counts.append(reads["n"])
    per_step = (counts[1] - counts[0]) / (2 * 10)  # 2 epochs, 10 more steps each
    assert per_step <= 1, counts


def test_compile_is_opt_in_and_trains_the_same_parameters() -> None:
    pytest.importorskip("torch._inductor")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    batches = _batches(3)
    eager, _ = _tiny_fit(batches)
    compiled, _ = _tiny_fit(batches, compile_model=True)
    assert not any(k.startswith("_orig_mod") for k in compiled.state_dict())  # state stays on the model
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_decoded_images_subset() -> None:
    images = DecodedImages(
        torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    )
    assert len(images.subset(slice(0, 4, 2))) == 2
    assert images.subset([3, 1]).labels.tolist() == [0, 1]


def test_a_non_finite_step_is_skipped_on_the_device_without_a_host_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA path (fused AdamW + found_inf), run on the CPU: the update is skipped, and counted."""
    from adaptflow.training import loop, step

    monkeypatch.setattr(step, "skips_on_device", lambda optimizer, device: True)
    monkeypatch.setattr(loop, "skips_on_device", lambda optimizer, device: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    assert optimizer._step_supports_amp_scaling  # type: ignore[attr-defined]
    (x, y), (bad_x, _) = _batches(2)
    bad_x[0, 0, 0, 0] = float("nan")
    skipped = torch.zeros((), dtype=torch.long)
    before = [p.detach().clone() for p in model.parameters()]
    step.train_step(model, bad_x, y, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"), skipped=skipped)
    assert int(skipped) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # not taken
    step.train_step(model, x, y, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"), skipped=skipped)
    assert int(skipped) == 1 and not torch.equal(before[0], next(model.parameters()))  # this one was taken
    assert all(torch.isfinite(p).all() for p in model.parameters())

    batches = _batches(3)
    batches[1][0][0, 0, 0, 0] = float("nan")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    result = fit(
        net,
        batches,
        batches[:1],
        torch.optim.AdamW(net.parameters(), fused=True),
        epochs=2,
        patience=5,
        device=torch.device("cpu"),
    )
    assert result.diverged is not None and "1 step(s) of epoch 1" in result.diverged and result.history == []
