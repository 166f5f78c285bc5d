"""Resolving backbone weights: torchvision's enum, or a mirror over file://, s3:// or http(s)://.

Air-gapped clusters mirror torchvision's files (``resnet50-11ad3fa6.pth``). The expected sha256
comes from ``backbone.sha256`` or, as in torchvision, from the hash prefix in the file name.
Weights are verified before they are cached; a mismatch is an error and nothing is cached.
Loading never unpickles: ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import struct
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from adaptflow.config import BackboneSpec
from adaptflow.contracts import Preprocessing
from adaptflow.errors import WeightsError
from adaptflow.storage import download_to, sha256_file

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the summary and the register stage read init_label from here,
# and a stage process that never touches torch saves ~1.5 s

log = logging.getLogger(__name__)

# torchvision.hub: "-<hex>." in the file name is a prefix of the file's sha256.
HASH_PREFIX = re.compile(r"-([a-f0-9]{8,64})\.")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_KEY = "adaptflow"
RANDOM_INIT = "random-init"  # the backbone_sha256 of a backbone trained from scratch


@dataclass
class ResolvedWeights:
    state_dict: dict[str, torch.Tensor] | None
    sha256: str
    source: str
    preprocessing: Preprocessing
    meta: dict[str, Any] = field(default_factory=dict)


def _filename(uri: str) -> str:
    return Path(urllib.parse.urlparse(uri).path).name or "weights.bin"


def expected_hash(spec: BackboneSpec, uri: str) -> str | None:
    if spec.sha256:
        return spec.sha256
    match = HASH_PREFIX.search(_filename(uri))
    return match.group(1) if match else None


def from_scratch(spec: BackboneSpec) -> bool:
    """``backbone.weights=none`` (and no mirror): a randomly initialised backbone, only when asked for."""
    return spec.weights_uri is None and (spec.weights is None or spec.weights.lower() in ("none", ""))


def init_label(backbone_sha256: str) -> str:
    """How a candidate's backbone started, in the words the summary, tags and report use."""
    return "from scratch" if backbone_sha256 == RANDOM_INIT else "pretrained"


def describe_backbone(name: str, backbone_sha256: str) -> str:
    """What a report says about the backbone: pretrained (with its hash) or from scratch."""
    if backbone_sha256 == RANDOM_INIT:
        return f"{name}, from scratch (backbone.weights=none)"
    return f"{name}, pretrained (sha256 {backbone_sha256[:12]})"


def _enum_weights(spec: BackboneSpec) -> Any:
    import torchvision

    if not spec.weights or spec.weights.lower() == "none":
        return None
    try:
        enum = torchvision.models.get_model_weights(spec.name)
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision has no weights enum for {spec.name!r}") from None
    name = spec.weights.split(".")[-1]
    if name == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[name]
    except KeyError:
        raise WeightsError(
            f"{spec.name} has no weights {spec.weights!r}",
            hint=f"valid: {', '.join(m.name for m in enum)}",
        ) from None


def _enum_source_task(weights: Any) -> dict[str, Any]:
    """The enum's source-task accuracy and classes (the transfer-gap signal's reference)."""
    return {key: weights.meta[key] for key in ("_metrics", "categories") if key in weights.meta}


def _enum_preprocessing(weights: Any) -> Preprocessing:
    t = weights.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else int(t.crop_size)
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else int(t.resize_size)
    interpolation = str(getattr(t.interpolation, "value", "bilinear"))
    return Preprocessing(
        input_size=int(crop),
        resize_size=int(resize),
        mean=tuple(float(x) for x in t.mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in t.std),  # type: ignore[arg-type]
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",  # type: ignore[arg-type]
    )


# What loading a refused or corrupt file raises (measured on torch 2.14.1, safetensors 0.8):
# the weights-only unpickler refuses anything but tensors and containers with UnpicklingError;
# a damaged zip archive is a RuntimeError from PytorchStreamReader; a truncated file is an
# EOFError; damaged legacy (non-zip) files surface as ValueError (UnicodeDecodeError, bad
# endianness), LookupError (IndexError, KeyError) or struct.error; safetensors raises
# SafetensorError, and a damaged adaptflow header a JSONDecodeError (a ValueError).
# Anything else (OSError, TypeError, MemoryError, ...) is not about the file's content and propagates.
_UNLOADABLE: tuple[type[Exception], ...] = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    LookupError,
    struct.error,
    SafetensorError,
)


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict + adaptflow metadata from a .safetensors or a torch (.pth/.pt) weights file."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            meta = json.loads(header[META_KEY]) if META_KEY in header else {}
            return check_finite(load_file(str(path)), path.name), meta
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except _UNLOADABLE as error:
        raise WeightsError(
            f"cannot load {path.name} safely: {error}",
            hint="weights must be a plain state dict (.pth) or safetensors; pickled objects are refused",
        ) from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path.name} does not hold a state dict")
    return check_finite(loaded, path.name), {}


def check_finite(state: dict[str, Any], source: str) -> dict[str, Any]:
    """``state``, after checking that no floating-point tensor holds NaN or inf (names the first)."""
    import torch

    for name, tensor in state.items():
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not torch.isfinite(tensor).all()
        ):
            raise WeightsError(
                f"{source}: tensor {name} holds NaN or infinite values",
                hint="the file is damaged or was saved from a diverged run: use weights from a good run",
            )
    return state


def fetch_verified(uri: str, expected: str | None, cache_dir: Path) -> tuple[Path, str]:
    """Downloads ``uri`` into ``cache_dir`` only if its sha256 matches ``expected`` (full or prefix)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = _filename(uri)
    if expected:
        # verified files are cached under their hash; a hit skips the download entirely
        for hit in cache_dir.glob(f"*--{name}"):
            if hit.name.split("--", 1)[0].startswith(expected):
                return hit, hit.name.split("--", 1)[0]
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=".partial-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        download_to(uri, tmp)
        digest = sha256_file(tmp)
        if expected and not digest.startswith(expected):
            raise WeightsError(
                f"sha256 mismatch for {uri}: expected {expected}..., got {digest}",
                hint="the mirror holds a different file than the one pinned; re-mirror it or fix backbone.sha256",
            )
        if not expected:
            log.warning("weights %s have no pinned sha256 (set backbone.sha256); recorded %s", uri, digest)
        final = cache_dir / f"{digest}--{name}"
        tmp.replace(final)
        return final, digest
    finally:
        tmp.unlink(missing_ok=True)


def resolve_weights(spec: BackboneSpec, cache_dir: str | Path) -> ResolvedWeights:
    """Weights (or none, for random init) with their sha256 and the preprocessing they expect."""
    import torch

    from adaptflow.models.factory import backbone_def

    backbone_def(spec.name)  # unknown names fail here, listing the valid ones
    # torchvision's enum (a 1-2 s import) only where it is needed: when it is the source, or when a
    # mirrored file does not carry its own preprocessing (adaptflow's own weights files do)
    enum = _enum_weights(spec) if spec.weights_uri is None else None
    uri = spec.weights_uri or (enum.url if enum is not None else None)
    if uri is None:
        log.warning(
            "backbone %s starts from scratch (backbone.weights=none): no pretrained weights", spec.name
        )
        return ResolvedWeights(None, RANDOM_INIT, "from scratch", default_preprocessing(spec))
    cache = Path(cache_dir)
    if enum is not None and spec.weights_uri is None:
        # The real path: torchvision downloads (or finds in TORCH_HOME) and checks the hash prefix itself.
        try:
            # torch.hub prints "Downloading: ..." on stdout, which is for --json
            with contextlib.redirect_stdout(sys.stderr):
                state = enum.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; a hash mismatch a RuntimeError
            raise WeightsError(
                f"cannot get the pretrained {spec.name} weights {spec.weights} from {enum.url}: {error}",
                hint=f"offline? mirror {_filename(enum.url)} and set backbone.weights_uri=<its URI> with "
                "backbone.sha256=<its sha256>, or train from scratch with backbone.weights=none",
            ) from None
        path = Path(torch.hub.get_dir()) / "checkpoints" / _filename(enum.url)
        digest = sha256_file(path) if path.exists() else HASH_PREFIX.search(_filename(enum.url)).group(1)  # type: ignore[union-attr]
        return ResolvedWeights(
            state, digest, enum.url, _override(_enum_preprocessing(enum), spec), _enum_source_task(enum)
        )
    path, digest = fetch_verified(uri, expected_hash(spec, uri), cache)
    state, meta = read_weights_file(path)
    if "preprocessing" in meta:
        pre = Preprocessing.model_validate(meta["preprocessing"])
    elif (enum := _enum_weights(spec)) is not None:
        pre = _enum_preprocessing(enum)
        meta = {**_enum_source_task(enum), **meta}
    else:
        pre = default_preprocessing(spec)
    arch = meta.get("architecture")
    if arch and arch != spec.name:
        raise WeightsError(
            f"weights {_filename(uri)} were trained for {arch}, but backbone.name is {spec.name}",
            hint=f"set backbone.name={arch}",
        )
    return ResolvedWeights(state, digest, uri, _override(pre, spec), meta)


def default_preprocessing(spec: BackboneSpec) -> Preprocessing:
    size = spec.input_size or 224
    return Preprocessing(
        input_size=size, resize_size=round(size * 256 / 224), mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


def _override(pre: Preprocessing, spec: BackboneSpec) -> Preprocessing:
    if spec.input_size is None or spec.input_size == pre.input_size:
        return pre
    ratio = pre.resize_size / pre.input_size
    return pre.model_copy(
        update={"input_size": spec.input_size, "resize_size": round(spec.input_size * ratio)}
    )


def save_weights_file(state: dict[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> str:
    """Writes a safetensors (metadata in the header) or .pth state dict; returns its sha256."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(contiguous, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    else:
        torch.save(contiguous, tmp)
    tmp.replace(path)
    return sha256_file(path)
