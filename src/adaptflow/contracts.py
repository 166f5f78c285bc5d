"""Typed results that flow between stages (DESIGN.md, "The stages and what flows between them").

Each result is a frozen pydantic model that a stage writes as JSON into the folder it is given,
so the same files work as KFP artifacts on a cluster and as plain folders on a laptop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema

from adaptflow.config import BackboneSpec
from adaptflow.data.snapshot_store import TABLES_KEY, Rows, as_rows, load_tables, save_tables

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: file name inside the stage's output folder
    FILE: ClassVar[str] = "result.json"

    def save(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        path = out / self.FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)  # atomic: a crash never leaves half a contract behind
        return path

    @classmethod
    def load(cls: type[C], folder: str | Path) -> C:
        return cls.model_validate_json((Path(folder) / cls.FILE).read_text())


C = TypeVar("C", bound=Contract)


class Preprocessing(BaseModel):
    """How an image becomes a tensor. Travels with weights, MLflow models and ONNX metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    sha256: str
    label: str
    split: Split
    width: int
    height: int
    etag: str | None = None


class QuarantineEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    reason: str


_EntryRows = Annotated[
    Rows[ManifestEntry],
    PlainValidator(lambda value: as_rows(ManifestEntry, value)),
    PlainSerializer(lambda rows: [r.model_dump() for r in rows]),
    WithJsonSchema({"type": "array", "items": ManifestEntry.model_json_schema()}),
]
_QuarantineRows = Annotated[
    Rows[QuarantineEntry],
    PlainValidator(lambda value: as_rows(QuarantineEntry, value)),
    PlainSerializer(lambda rows: [r.model_dump() for r in rows]),
    WithJsonSchema({"type": "array", "items": QuarantineEntry.model_json_schema()}),
]


class Snapshot(Contract):
    """What ingest produced: an immutable, fingerprinted view of the dataset.

    Saved as ``snapshot.json`` (metadata) beside Parquet files of its entries and quarantined files
    (``data/snapshot_store.py``); ``load`` reads the metadata only, ``split`` reads one split's rows,
    ``entries`` reads them all once. An older ``snapshot.json`` with its entries inline still loads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    FILE: ClassVar[str] = "snapshot.json"

    source_uri: str
    class_names: tuple[str, ...]
    entries: _EntryRows
    quarantined: _QuarantineRows = Field(default_factory=lambda: Rows(QuarantineEntry, items=()))
    fingerprint: str
    counts: dict[str, int]
    class_counts: dict[str, dict[str, int]] = Field(description="split -> class -> count")

    def split(self, name: Split) -> list[ManifestEntry]:
        entries: Sequence[ManifestEntry] = self.entries
        if isinstance(entries, Rows):
            return entries.where("split", name)
        return [e for e in entries if e.split == name]  # set by model_copy(update=...) as a tuple

    def save(self, folder: str | Path) -> Path:
        metadata = self.model_dump(mode="json", exclude={"entries", "quarantined"})
        tables: dict[str, tuple[type[BaseModel], Sequence[Any]]] = {
            "entries": (ManifestEntry, self.entries),
            "quarantined": (QuarantineEntry, self.quarantined),
        }
        return save_tables(Path(folder), metadata, tables, self.FILE)

    @classmethod
    def load(cls, folder: str | Path) -> Snapshot:
        document = json.loads((Path(folder) / cls.FILE).read_text())
        if TABLES_KEY in document:
            models: dict[str, type[BaseModel]] = {"entries": ManifestEntry, "quarantined": QuarantineEntry}
            document = load_tables(Path(folder), document, models)
        return cls.model_validate(document)


class CostFigures(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_seconds: float
    trainable_params: int
    total_params: int
    train_images_per_second: float | None = None
    peak_memory_mb: float | None = None
    epochs_run: int = 0
    backbone_forward_images: int = Field(0, description="images pushed through the backbone by this stage")
    device: str = "cpu"


class EpochRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


class Candidate(Contract):
    """A trained model: weights in ``model.safetensors`` beside this file, plus everything to use it."""

    FILE: ClassVar[str] = "candidate.json"
    WEIGHTS: ClassVar[str] = "model.safetensors"
    #: ``extra`` key of a candidate whose training diverged: where it stopped. Evaluate never lets it win.
    DIVERGED: ClassVar[str] = "diverged"

    name: str
    strategy: str
    backbone: BackboneSpec
    backbone_sha256: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    metrics: dict[str, float]
    cost: CostFigures
    history: tuple[EpochRecord, ...] = ()
    extra: dict[str, str] = Field(default_factory=dict, description="strategy-specific facts")


class FinetuneDecision(BaseModel):
    """The advisor's verdict, with the signals it measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    should_finetune: bool
    strategy: str
    reason: str
    signals: dict[str, float | int | str | None]
    # set when the advisor chose the learning-rate profile too (high domain shift: uniform rates)
    layer_decay: float | None = None


class BaselineResult(Contract):
    FILE: ClassVar[str] = "baseline.json"

    candidate: Candidate
    decision: FinetuneDecision


class ModelScore(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["candidate", "champion", "reference"]
    version: str | None = None
    accuracy: float
    accuracy_ci95: tuple[float, float]
    macro_f1: float
    per_class_precision: dict[str, float]
    per_class_recall: dict[str, float]
    confusion_matrix: list[list[int]]
    n: int
    # mean cross-entropy on the test split (candidates; the winner's tie-breaker)
    log_loss: float | None = None


class ChampionRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    version: str
    run_id: str | None = None
    uri: str


class Evaluation(Contract):
    FILE: ClassVar[str] = "evaluation.json"

    scores: tuple[ModelScore, ...]
    winner: str
    winner_reason: str
    champion: ChampionRef | None = None
    champion_note: str | None = Field(None, description="why no champion was scored, if none was")
    mcnemar_p_value: float | None = Field(None, description="winner vs champion, exact McNemar test")
    test_size: int
    fingerprint: str

    def score(self, name: str) -> ModelScore:
        for s in self.scores:
            if s.name == name:
                return s
        raise KeyError(name)

    def champion_score(self) -> ModelScore | None:
        return next((s for s in self.scores if s.kind == "champion"), None)

    def reference_score(self) -> ModelScore | None:
        """The better reference (the floor the gate holds a winner to); None for older evaluations."""
        references = [s for s in self.scores if s.kind == "reference"]
        return max(references, key=lambda s: s.accuracy) if references else None


class ExportResult(Contract):
    FILE: ClassVar[str] = "export.json"
    ONNX: ClassVar[str] = "model.onnx"

    candidate: str
    max_abs_diff: float
    parity: dict[str, float] = Field(description="batch size -> max |ort - torch|")
    tolerance: float
    passed: bool
    latency_ms_p50: float
    latency_ms_p95: float
    opset: int
    size_bytes: int


class GateDecision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    promote: bool
    reasons: tuple[str, ...]


class Registration(Contract):
    FILE: ClassVar[str] = "registration.json"

    model_name: str
    version: str
    model_uri: str
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    gate: GateDecision


class StrategyOutcome(Contract):
    """One row of the comparison: a trained model, its test score and what it cost."""

    FILE: ClassVar[str] = "outcome.json"

    strategy: str
    candidate: str
    score: ModelScore
    trainable_params: int
    total_params: int
    wall_seconds: float
    images_per_second: float | None
    peak_memory_mb: float | None
    train_accuracy: float
    val_accuracy: float
    train_val_gap: float
    best_epoch: int
    val_loss: float | None = None
    epochs_run: int
    history: tuple[EpochRecord, ...] = ()
    p_value_vs_baseline: float | None = None
    run_id: str | None = None


class CompareResult(Contract):
    FILE: ClassVar[str] = "compare.json"

    data_uri: str
    fingerprint: str
    class_names: tuple[str, ...]
    counts: dict[str, int]
    min_train_images_per_class: int
    test_size: int
    decision: FinetuneDecision
    outcomes: tuple[StrategyOutcome, ...]
    best: str
    best_reason: str
    finetune_margin: float
    epochs: int
    device: str
    backbone: str = ""  # e.g. "resnet18, pretrained (sha256 fc872bdd…)" or "resnet18, from scratch"
    tracking_uri: str | None = None
    run_id: str | None = None
    report_html: str | None = None
    report_markdown: str | None = None
    references: tuple[ModelScore, ...] = Field((), description="the pixel references, same test split")
    # what the test split supports (adaptflow.report_decision.decide): a difference it cannot resolve
    # is a tie, and the cheaper strategy is preferred. ``best`` is the margin rule's pick, as evaluate ships.
    supported_best: str | None = None
    supported_best_reason: str | None = None
    tied_with: tuple[str, ...] = ()

    def outcome(self, strategy: str) -> StrategyOutcome:
        for o in self.outcomes:
            if o.strategy == strategy:
                return o
        raise KeyError(strategy)
