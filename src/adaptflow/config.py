"""Typed, validated configuration: one frozen pydantic model per stage.

Precedence: defaults, then the YAML file, then ``--set section.key=value`` overrides.
Every error names the dotted path of the offending key, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from adaptflow.config_base import Section, dump_yaml, load_yaml
from adaptflow.config_cluster import ClusterConfig
from adaptflow.errors import ConfigError

FinetuneStrategy = Literal["linear_probe", "partial", "full", "lora", "gradual"]
#: every fine-tuning strategy, in the order reports list them: the one source of these names
FINETUNE_STRATEGIES: tuple[str, ...] = get_args(FinetuneStrategy)
#: what ``adaptflow compare`` can run: the strategies, plus training from scratch as the control
COMPARE_STRATEGIES: tuple[str, ...] = (*FINETUNE_STRATEGIES, "scratch")


class IngestConfig(Section):
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="share of images for validation")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="share of images for the test split")
    min_images_per_class: int = Field(5, ge=3, description="a class with fewer valid images is an error")
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    max_image_pixels: int = Field(40_000_000, gt=0, description="larger images are quarantined")
    split_salt: str = Field("adaptflow-split-v1", description="changing it reshuffles every split")
    # the few-images condition: val and test are unchanged
    train_per_class: int | None = Field(None, ge=1, description="keep N training images per class")
    # S3 listing and download settings (used for s3:// sources and manifest rows).
    s3_max_attempts: int = Field(8, ge=1)
    download_workers: int = Field(8, ge=1, le=64)
    # Bounds on hostile inputs: anything outside them is quarantined with a reason, never opened.
    max_aspect_ratio: float = Field(
        20.0, gt=1.0, allow_inf_nan=False, description="longer / shorter side; thinner images are quarantined"
    )
    allowed_roots: tuple[str, ...] = Field(
        (), description="where local files may also resolve to, besides the ImageFolder or manifest's folder"
    )
    allowed_schemes: tuple[str, ...] = Field(
        ("s3",), description="URI schemes manifest rows may use: s3, http, https (needs allowed_hosts)"
    )
    allowed_hosts: tuple[str, ...] = Field((), description="hosts (or host:port) http(s) rows may fetch from")

    @field_validator("allowed_schemes")
    @classmethod
    def _known_schemes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = ("s3", "http", "https")
        unknown = [s for s in value if s not in known]
        if unknown:
            raise ValueError(f"unknown scheme(s) {unknown}: use lowercase names from {', '.join(known)}")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _lowercase_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in value)  # host names are case-insensitive

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        relative = [r for r in value if not Path(r).is_absolute()]
        if relative:  # relative to which working directory? a pipeline step's is not the user's
            raise ValueError(f"must be absolute paths, got {relative}")
        return value

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> IngestConfig:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self

    @model_validator(mode="after")
    def _http_needs_hosts(self) -> IngestConfig:
        if {"http", "https"} & set(self.allowed_schemes) and not self.allowed_hosts:
            raise ValueError("allowed_schemes lists http(s), so allowed_hosts must name the hosts to trust")
        return self


class BackboneSpec(Section):
    name: str = Field("resnet18", description="torchvision architecture name, see `adaptflow backbones`")
    weights: str | None = Field(
        "DEFAULT", description="torchvision weights enum member (DEFAULT: ImageNet); none: from scratch"
    )
    weights_uri: str | None = Field(
        None, description="mirror of the weights: file://, s3://, https:// or a local path"
    )
    sha256: str | None = Field(None, description="expected sha256 of the weights file (full or prefix)")
    input_size: int | None = Field(None, ge=16, le=1024, description="override the weights' input size")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.lower()
            if len(value) < 8 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError("must be a hex sha256 digest (or a prefix of at least 8 characters)")
        return value


class AdvisorConfig(Section):
    """When is fine-tuning worth its cost? Each signal is measured and recorded."""

    target_accuracy: float = Field(
        0.97,
        ge=0.0,
        le=1.0,
        description="enough when the baseline's val accuracy (95% lower bound) reaches it",
    )
    min_images_per_class: int | None = Field(
        None,
        ge=1,
        description="fewer training images per class: keep the baseline; off by default: on Fashion-MNIST "
        "fine-tuning beat the probe even with 6 training images per class (bench/RESULTS.md)",
    )
    budget_seconds: float = Field(900.0, gt=0, description="estimated fine-tuning time must fit")
    force: bool | None = Field(None, description="true/false overrides the decision (recorded as such)")
    shift_sample_images: int = Field(
        256, ge=1, description="training images the domain-shift signal is measured on (an even sample)"
    )
    choose_strategy: bool = Field(
        True,
        description="when fine-tuning pays, let the advisor pick the strategy and learning-rate profile "
        "from the signals (high domain shift: full with uniform rates; few images: partial); "
        "false keeps finetune.strategy and finetune.layer_decay",
    )
    high_shift: float = Field(
        0.25,
        gt=0,
        description="choose_strategy: domain_shift (BatchNorm-statistics KL) at or above this picks full "
        "fine-tuning with uniform learning rates; calibrated on the demo, measure your own data",
    )
    few_images_per_class: int = Field(
        50, ge=1, description="choose_strategy: below this (and low shift) prefer partial fine-tuning"
    )


class BaselineConfig(Section):
    epochs: int = Field(
        50, ge=1, description="L-BFGS steps of the linear probe (each up to lbfgs_iterations)"
    )
    lbfgs_iterations: int = Field(20, ge=1)
    l2: float = Field(1e-3, ge=0, description="L2 penalty on the head's weights")
    patience: int = Field(10, ge=1, description="steps without val improvement before stopping")
    feature_batch_size: int = Field(128, ge=1)
    feature_cache_dir: str | None = Field(
        None, description="where backbone features are cached; default <workdir>/cache/features"
    )
    advisor: AdvisorConfig = AdvisorConfig()


class FinetuneConfig(Section):
    strategy: FinetuneStrategy = "full"
    strategy_locked: bool = Field(
        False,
        description="true: the advisor never changes finetune.strategy (it still decides whether to "
        "fine-tune, and may still choose uniform learning rates under high domain shift)",
    )
    unfreeze_blocks: int = Field(2, ge=1, description="partial: how many of the last blocks train")
    epochs: int | None = Field(
        None, ge=1, description="null: planned from the data (training/schedule.py); a number: exactly that"
    )
    min_steps: int = Field(
        300, ge=1, description="plan at least this many optimizer steps: small sets, more epochs"
    )
    max_epochs: int = Field(100, ge=1, description="most epochs planned; early stopping may end sooner")
    lr: float = Field(1e-3, gt=0, description="learning rate of the head")
    layer_decay: float = Field(0.5, gt=0, le=1, description="each earlier block's lr is multiplied by this")
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(
        64, ge=1, description="largest batch; small sets get batches giving 8 steps/epoch"
    )
    patience: int = Field(4, ge=1, description="epochs without val improvement (at least planned epochs / 4)")
    freeze_bn: bool = Field(
        False,
        description="keep BatchNorm running statistics as pretrained; off by default: with a shifted target "
        "frozen statistics made fine-tuning worse than the frozen baseline (bench/RESULTS.md)",
    )
    augment: bool = True
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, gt=0)
    gradual_epochs_per_block: int = Field(2, ge=1)
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader workers; null: 0 when the decoded images fit in memory, else up to 4 "
        "(the CPUs the process may use)",
    )
    compile: bool = Field(False, description="run training through torch.compile (opt-in: it compiles first)")
    data_source: Literal["decoded", "shards"] = Field(
        "decoded",
        description="decoded: each split decoded once into one uint8 file (it fits one disk); shards: "
        "WebDataset tar shards under shards_root, streamed and decoded per shard into a bounded cache",
    )
    shards_root: str | None = Field(
        None, description="shards: where the shard step writes (s3://bucket/prefix)"
    )
    shard_bytes: int = Field(256_000_000, ge=1_000_000, description="shards: target size of one tar shard")
    shard_cache_dir: str | None = Field(
        None, description="shards: the decoded-shard cache; null: <decoded cache>/shards"
    )
    shard_cache_bytes: int = Field(
        20 << 30, ge=1 << 20, description="shards: decoded-shard cache limit (LRU)"
    )
    accumulation_steps: int = Field(
        1, ge=1, description="split each batch into this many passes and add up their gradients (less memory)"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    amp: bool = Field(True, description="bf16 autocast on CUDA")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="also checkpoint every N optimizer steps (0: at epoch ends only)"
    )
    checkpoint_min_seconds: float = Field(
        30.0, ge=0, description="skip an epoch-end checkpoint younger than this (0: every epoch)"
    )


class EvaluateConfig(Section):
    finetune_margin: float = Field(
        0.01, ge=0, description="fine-tuning must beat transfer learning by this much test accuracy to win"
    )
    batch_size: int = Field(256, ge=1)
    bootstrap_samples: int = Field(1000, ge=100)
    reference_pixels: int = Field(16, ge=4, le=64, description="side of the references' grayscale pixels")


class ExportConfig(Section):
    opset: int = Field(18, ge=13)
    # empty would pass export without ever comparing onnxruntime with torch
    parity_batch_sizes: tuple[int, ...] = Field((1, 3, 7), min_length=1)
    tolerance: float = Field(1e-4, gt=0, description="max |onnxruntime - torch| over logits")
    latency_runs: int = Field(30, ge=1)


class GateConfig(Section):
    min_accuracy: float = Field(0.8, ge=0, le=1, description="absolute floor on test accuracy")
    min_delta: float = Field(0.005, ge=0, description="must beat the champion's fresh score by this much")
    max_latency_ms: float = Field(250.0, gt=0, description="ONNX batch-1 p50 latency budget")
    require_significance: bool = False
    alpha: float = Field(0.05, gt=0, lt=1)
    reference_margin: float | None = Field(0.0, ge=0, le=1, description="beat references by; null: off")


class RegistryConfig(Section):
    model_name: str = Field("adaptflow-digits", min_length=1)
    lease_uri: str | None = Field(
        None,
        description="where promotion leases live, shared by every promoter: s3://bucket/prefix (conditional "
        "puts) or a folder on a shared filesystem (file:///path); default: beside s3:// artifacts, else a "
        "file lock under the workdir, which guards this machine only",
    )
    lease_ttl_seconds: float = Field(120.0, gt=0)
    lease_wait_seconds: float = Field(300.0, gt=0)

    @field_validator("lease_uri")
    @classmethod
    def _lease_location(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("s3://"):
            if not value[5:].split("/", 1)[0]:
                raise ValueError("s3:// lease URI needs a bucket: s3://bucket/prefix")
        elif not (value.startswith("file:///") or value.startswith("/")):
            raise ValueError("must be s3://bucket/prefix, file:///shared/folder or an absolute path")
        return value


class TrackingConfig(Section):
    experiment: str = Field("adaptflow", min_length=1)
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else embedded SQLite"
    )


class Settings(Section):
    seed: int = 0
    workdir: str = Field(".adaptflow", description="local state: embedded MLflow, caches, demo data")
    threads: int | None = Field(
        None, ge=1, description="torch threads per stage; null: the CPUs the process may use (cgroup quota)"
    )
    ingest: IngestConfig = IngestConfig()
    backbone: BackboneSpec = BackboneSpec()
    baseline: BaselineConfig = BaselineConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("ingest")
    @classmethod
    def _some_extensions(cls, value: IngestConfig) -> IngestConfig:
        # no extension finds no image, which ingest would report as empty data, not as this key
        if not value.extensions:
            raise ValueError("extensions: must list at least one file extension, e.g. [.png, .jpg]")
        return value

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """Hash of everything that changes what a run computes (where it runs and tracks excluded)."""
        data = self.model_dump(mode="json")
        for key in ("workdir", "threads", "tracking", "cluster"):
            data.pop(key, None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return _validate(json.loads(text), source="config JSON")


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def _validate(data: dict[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(
            _format_validation_error(error, source),
            hint="fix the key named above; `adaptflow config show` prints every key with its default",
        ) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``baseline.advisor.target_accuracy=0.9`` -> (["baseline", "advisor", "target_accuracy"], 0.9)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {error}") from None
    return [part for part in key.strip().split(".")], value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"override {'.'.join(path)}: {where} is a value, not a section")
        node = child
    node[path[-1]] = value


def load_settings(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Defaults, then the YAML file, then overrides; validated once, errors name the key path."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"config file {file} does not exist", hint="pass an existing YAML file to --config"
            )
        try:
            loaded = load_yaml(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {file} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {file} must hold a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
        source = str(file)
    for override in overrides:
        keys, value = parse_override(override)
        _apply_override(data, keys, value)
    if overrides:
        source += " + --set overrides"
    return _validate(data, source)


def dump_settings(settings: Settings) -> str:
    """The resolved config as YAML, written next to the outputs and logged to MLflow."""
    return dump_yaml(settings.model_dump(mode="json"))
