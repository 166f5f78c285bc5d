"""Decoding images and turning them into tensors with the preprocessing that travels with a model."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from adaptflow.contracts import ManifestEntry, Preprocessing
from adaptflow.errors import DataError
from adaptflow.storage import read_bytes, sha256_bytes

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message is the quarantine reason."""


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
    """Fully decodes ``data`` into RGB, so truncated files fail here and not mid-training."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}x{height}, above max_image_pixels={max_pixels}")
            probe.load()  # forces a full decode: truncated/corrupt data raises here
            return probe.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        raise ImageDecodeError(f"cannot decode image: {type(error).__name__}: {error}") from None


class ImageStore:
    """Reads snapshot images by URI and checks each against its recorded sha256.

    A snapshot references images where they live; if a file changed after ingest, reading it is
    an error (re-run ingest) rather than silently training on different data. Bytes are kept in
    a small in-process cache so epochs do not re-read S3.
    """

    def __init__(self, cache_bytes: int = 512 << 20) -> None:
        self._cache: dict[str, bytes] = {}
        self._size = 0
        self._limit = cache_bytes
        self._lock = threading.Lock()

    def read(self, entry: ManifestEntry) -> bytes:
        with self._lock:
            cached = self._cache.get(entry.sha256)
        if cached is not None:
            return cached
        data = read_bytes(entry.uri)
        if sha256_bytes(data) != entry.sha256:
            raise DataError(
                f"{entry.uri} changed after ingest (sha256 differs from the snapshot)",
                hint="re-run the pipeline so ingest takes a fresh snapshot",
            )
        with self._lock:
            if self._size + len(data) <= self._limit:
                self._cache[entry.sha256] = data
                self._size += len(data)
        return data

    def image(self, entry: ManifestEntry) -> Image.Image:
        return decode_image(self.read(entry))


def _transform(pre: Preprocessing, augment: list[Any]) -> v2.Compose:
    """Resize, centre crop, ``augment``, then scale and normalise: one recipe for training and inference."""
    import torch
    from torchvision.transforms import v2

    interpolation = v2.InterpolationMode(pre.interpolation)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(pre.input_size),
            *augment,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(pre.mean), list(pre.std)),
        ]
    )


def eval_transform(pre: Preprocessing) -> v2.Compose:
    return _transform(pre, [])


def train_transform(pre: Preprocessing) -> v2.Compose:
    """Mild augmentation: small shifts/rotations and scale. No flips: they change what digits/text mean."""
    from torchvision.transforms import v2

    return _transform(pre, [v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1))])


class ManifestDataset:
    """A torch-style dataset over snapshot entries: (tensor, class index)."""

    def __init__(
        self,
        entries: list[ManifestEntry],
        class_names: tuple[str, ...] | list[str],
        transform: v2.Compose,
        store: ImageStore | None = None,
    ) -> None:
        self.entries = entries
        self.index = {name: i for i, name in enumerate(class_names)}
        self.transform = transform
        self.store = store or ImageStore()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        entry = self.entries[i]
        return self.transform(self.store.image(entry)), self.index[entry.label]


def load_tensor_batch(paths: list[str | Path], pre: Preprocessing) -> torch.Tensor:
    """Files -> one normalized batch, for predict and parity checks."""
    import torch

    transform = eval_transform(pre)
    return torch.stack([transform(decode_image(Path(p).read_bytes())) for p in paths])
