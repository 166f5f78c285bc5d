"""Decoding images and turning them into tensors with the preprocessing that travels with a model."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from adaptflow.contracts import ManifestEntry, Preprocessing
from adaptflow.errors import DataError
from adaptflow.storage import read_bytes, sha256_bytes

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message is the quarantine reason."""


#: the largest ``Preprocessing.resize_size`` a run can use: ``backbone.input_size`` is at most 1024
#: and resize is input * 256/224. Ingest runs before the backbone is known, so it bounds with this.
LARGEST_RESIZE = 1170
#: the default ``ingest.max_image_pixels``; see ``resize_limit``
DEFAULT_MAX_PIXELS = 40_000_000


def resize_limit(max_pixels: int, resize_size: int | None) -> tuple[int, int]:
    """(resize size, pixel limit) to bound the resized image with.

    With the run's resize known, the limit is ``max_pixels``. Without it (ingest), the bound is the
    largest resize a run can use, against at least the default limit: a lowered ``max_image_pixels``
    (say 50k) is about source images, and would otherwise refuse every small image, since Resize
    enlarges them all to 1170 px. Either way a resized image stays below max_pixels (or 40M) pixels.
    """
    if resize_size is not None:
        return resize_size, max_pixels
    return LARGEST_RESIZE, max(max_pixels, DEFAULT_MAX_PIXELS)


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """What ``v2.Resize(resize_size)`` makes of a ``width`` x ``height`` image: the short side becomes
    ``resize_size`` and the long side keeps the aspect ratio (truncated, as torchvision does)."""
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def check_geometry(
    width: int,
    height: int,
    max_pixels: int,
    max_aspect_ratio: float | None = None,
    resize_size: int | None = None,
    max_resized_pixels: int | None = None,
) -> None:
    """Raises ImageDecodeError when an image (or what Resize makes of it) is too large or too thin.

    The resized image is bounded by ``max_resized_pixels`` (default: ``max_pixels``).
    Checked on the header, before decoding: a 1x400,000 PNG is a few hundred bytes and 400k pixels,
    but ``Resize(32)`` turns it into 32x12,800,000.
    """
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image is {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(f"image is {width}x{height}, above max_image_pixels={max_pixels}")
    ratio = max(width, height) / min(width, height)
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        raise ImageDecodeError(
            f"image is {width}x{height}: aspect ratio {ratio:.4g} is above max_aspect_ratio={max_aspect_ratio:g}"
        )
    if resize_size is not None:
        limit = max_pixels if max_resized_pixels is None else max_resized_pixels
        new_w, new_h = resized_size(width, height, resize_size)
        if new_w * new_h > limit:
            raise ImageDecodeError(
                f"image is {width}x{height}; resized to a short side of {resize_size} it would be "
                f"{new_w}x{new_h}, above the pixel limit of {limit}"
            )


def _upright(image: Image.Image) -> Image.Image:
    """Applies the EXIF orientation, as a photo viewer would: phones store portraits sideways."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is metadata damage, not a broken picture: keep the pixels
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with the full range kept.

    ``convert("RGB")`` clips high-bit-depth modes to 255 instead of scaling them, which binarises
    a 16-bit grayscale PNG. So: 16-bit (``I;16*``, and ``I`` holding 0..65535) is divided by 257
    (65535 -> 255); float (``F``) is taken as 0..1, the usual convention, and anything outside it
    is refused rather than guessed at (per-image min/max stretching would make the same scene
    differ in brightness between files).
    """
    mode = image.mode
    if not (mode.startswith("I") or mode == "F"):
        return image.convert("RGB")
    values = np.asarray(image)
    if mode == "F":
        if not np.isfinite(values).all():
            raise ImageDecodeError("float image has NaN or infinite pixels")
        low, high = float(values.min()), float(values.max())
        if low < -1e-3 or high > 1 + 1e-3:  # a little slack for rounding in the writer
            raise ImageDecodeError(
                f"float image has values in [{low:g}, {high:g}]; expected 0..1 (convert it to 8 or 16 bit)"
            )
        scaled = np.clip(values, 0.0, 1.0) * 255.0
    else:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageDecodeError(
                f"32-bit integer image has values in [{low}, {high}]; expected 16-bit data (0..65535)"
            )
        scaled = values.astype(np.float64) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L").convert("RGB")


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_aspect_ratio: float | None = None,
    resize_size: int | None = None,
    max_resized_pixels: int | None = None,
) -> Image.Image:
    """The one way adaptflow opens an image (ingest, training and predict): bytes -> upright 8-bit RGB.

    Fully decodes, so truncated files fail here and not mid-training; applies the EXIF orientation;
    scales 16-bit and float images to 8 bit (see ``_to_rgb``). The size limits are checked on the
    header, before any pixel is decoded.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            check_geometry(*probe.size, max_pixels, max_aspect_ratio, resize_size, max_resized_pixels)
            probe.load()  # forces a full decode: truncated/corrupt data raises here
            return _to_rgb(_upright(probe))
    except ImageDecodeError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        if isinstance(error, UnidentifiedImageError):  # its message names an in-memory buffer, not the file
            raise ImageDecodeError("not an image format PIL can read") from None
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

    def __getstate__(self) -> dict[str, int]:
        # to a decoding worker process: the limit, not the cached bytes or the lock
        return {"limit": self._limit}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["limit"])  # type: ignore[misc]

    def read(self, entry: ManifestEntry) -> bytes:
        with self._lock:
            cached = self._cache.get(entry.sha256)
        if cached is not None:
            return cached
        data = read_bytes(entry.uri)
        if sha256_bytes(data) != entry.sha256:
            raise DataError(
                f"{entry.uri} changed after ingest (sha256 differs from the snapshot)",
                hint="re-run the pipeline so ingest takes a fresh snapshot; where a manifest names the "
                "file's sha256, restore the file or correct that row (ingest trusts it while it is unchanged)",
            )
        with self._lock:
            if self._size + len(data) <= self._limit:
                self._cache[entry.sha256] = data
                self._size += len(data)
        return data

    def image(self, entry: ManifestEntry) -> Image.Image:
        return decode_image(self.read(entry))


class ResizeCrop:
    """An image -> a ``uint8`` tensor, resized (shorter side to ``resize_size``) and centre-cropped:
    the deterministic first half of every transform, and what the decoded-image cache stores
    (training/decoded.py).

    torchvision's functional ops on the PIL image, called directly: the ``v2.Compose`` of
    ``ToImage, Resize, CenterCrop`` gives the same pixels (PIL's antialiased filters are what
    torch's match) but its per-call dispatch cost 0.17 ms of the 0.2 ms a 28-px image took, which
    made decoding the baseline's largest part. Bilinear and bicubic match ``v2.Resize`` on a tensor
    to within 1 (bicubic up to 11 on small upscales); "nearest" does not (PIL's centres pixels, torch's
    does not), so it still resizes the tensor, and a model trained earlier sees the same pixels.
    """

    def __init__(self, pre: Preprocessing) -> None:
        from torchvision.transforms import v2

        self.resize_size = pre.resize_size
        self.input_size = pre.input_size
        self.interpolation = v2.InterpolationMode(pre.interpolation)
        self.tensor_first = self.interpolation == v2.InterpolationMode.NEAREST

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        source = F.to_image(image) if self.tensor_first else image
        resized = F.resize(source, [self.resize_size], interpolation=self.interpolation, antialias=True)
        return F.to_image(F.center_crop(resized, [self.input_size]))


def _transform(pre: Preprocessing, augment: list[Any]) -> v2.Compose:
    """Resize, centre crop, ``augment``, then scale and normalise: one recipe for training and inference."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            ResizeCrop(pre),
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


def load_tensor_batch(paths: list[str | Path], pre: Preprocessing) -> torch.Tensor:
    """Files -> one normalized batch, for predict and parity checks."""
    import torch

    transform = eval_transform(pre)
    return torch.stack(
        [transform(decode_image(Path(p).read_bytes(), resize_size=pre.resize_size)) for p in paths]
    )
