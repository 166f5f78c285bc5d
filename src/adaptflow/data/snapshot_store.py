"""A snapshot's rows as Parquet: read lazily, one split at a time, never as one JSON document.

A saved snapshot is a folder: ``snapshot.json`` holds the metadata (source, class names, fingerprint,
counts) and names two Parquet files beside it, ``entries-<hash>.parquet`` and
``quarantined-<hash>.parquet``. The entries are stored stably sorted by split, so a split is a
handful of row groups that a filter reads without touching the rest; a ``position`` column keeps the
order the rows were given in. File names carry a hash of their bytes and the JSON is replaced last,
so a save that fails half-way leaves the previous snapshot whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from pydantic import BaseModel

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

M = TypeVar("M", bound=BaseModel)

#: the metadata key that marks the Parquet layout (an older snapshot.json holds its entries inline)
TABLES_KEY = "tables"
ROW_GROUP_ROWS = 64 * 1024
#: columns with few distinct values, worth a Parquet dictionary
FEW_VALUES = ("label", "split")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Parquet columns of a row model: its fields, in order, with their nullability."""
    import pyarrow as pa

    fields = []
    for name, info in model.model_fields.items():
        kind = pa.int64() if info.annotation in (int, int | None) else pa.string()
        fields.append(pa.field(name, kind, nullable=not info.is_required()))
    return pa.schema(fields)


def models_to_table(model: type[M], rows: Sequence[M]) -> pa.Table:
    import pyarrow as pa

    schema = arrow_schema(model)
    columns = {name: [getattr(r, name) for r in rows] for name in schema.names}
    return pa.table(columns, schema=schema)


def table_to_models(model: type[M], table: pa.Table) -> tuple[M, ...]:
    names = list(model.model_fields)
    columns = [table.column(n).to_pylist() for n in names]
    # the rows were validated when they were made; model_construct skips validating them again
    return tuple(
        model.model_construct(**dict(zip(names, values, strict=True)))
        for values in zip(*columns, strict=True)
    )


class Rows(Sequence[M], Generic[M]):
    """A snapshot's rows: given as a tuple, held as an Arrow table, or read from Parquet on first use.

    It reads as the tuple it replaces (``len``, index, iterate, compare with a tuple); ``where``
    reads only the rows whose column equals a value, from the file when nothing is loaded yet.
    """

    def __init__(
        self,
        model: type[M],
        *,
        items: tuple[M, ...] | None = None,
        table: pa.Table | None = None,
        path: Path | None = None,
        length: int | None = None,
    ) -> None:
        self.model = model
        self._items = items
        self._table = table
        self._path = path
        self._length = length

    def __len__(self) -> int:
        if self._items is not None:
            return len(self._items)
        if self._table is not None:
            return int(self._table.num_rows)
        if self._length is None:
            import pyarrow.parquet as pq

            self._length = int(pq.ParquetFile(self._require_path()).metadata.num_rows)
        return self._length

    def _require_path(self) -> Path:
        assert self._path is not None, "Rows without items, table or path"
        return self._path

    def table(self) -> pa.Table:
        """All rows as an Arrow table, in their order."""
        if self._table is None:
            if self._items is not None:
                self._table = models_to_table(self.model, self._items)
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(self._require_path())
                if "position" in table.column_names:
                    table = table.sort_by("position").drop_columns(["position"])
                self._table = table
        return self._table

    def items(self) -> tuple[M, ...]:
        if self._items is None:
            self._items = table_to_models(self.model, self.table())
        return self._items

    def where(self, column: str, value: str) -> list[M]:
        """The rows whose ``column`` equals ``value``, in order; from the file, if not in memory."""
        if self._items is not None:
            return [r for r in self._items if getattr(r, column) == value]
        import pyarrow.compute as pc

        if self._table is not None:
            return list(table_to_models(self.model, self._table.filter(pc.field(column) == value)))
        import pyarrow.parquet as pq

        table = pq.read_table(self._require_path(), filters=pc.field(column) == value)
        if "position" in table.column_names:
            table = table.sort_by("position")
        return list(table_to_models(self.model, table))

    @overload
    def __getitem__(self, index: int) -> M: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[M, ...]: ...
    def __getitem__(self, index: int | slice) -> M | tuple[M, ...]:
        return self.items()[index]

    def __iter__(self) -> Iterator[M]:
        return iter(self.items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Rows):
            return self.items() == other.items()
        if isinstance(other, tuple | list):
            return self.items() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.items())

    def __repr__(self) -> str:
        return f"Rows[{self.model.__name__}]({len(self)} rows)"


def as_rows(model: type[M], value: object) -> Rows[M]:
    """A pydantic validator: Rows pass through; a tuple or list of rows (or dicts) becomes Rows."""
    if isinstance(value, Rows):
        return value
    if isinstance(value, tuple | list):
        return Rows(model, items=tuple(model.model_validate(v) for v in value))
    raise ValueError(f"expected a sequence of {model.__name__}, got {type(value).__name__}")


def _table_of(model: type[M], rows: Sequence[M]) -> pa.Table:
    return rows.table() if isinstance(rows, Rows) else models_to_table(model, tuple(rows))


def value_ranks(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Each value's rank among the column's distinct values in ascending order (UTF-8 byte order,
    which is Python's code point order): sorting these small integers, stably, is a sort by the
    column. Arrow's string sorts are slow on a column of few values and a million rows."""
    import numpy as np
    import pyarrow.compute as pc

    codes = pc.dictionary_encode(column)
    codes = codes.combine_chunks() if hasattr(codes, "combine_chunks") else codes
    names = np.array(codes.dictionary.to_pylist(), dtype=object)
    rank = np.argsort(np.argsort(names)) if len(names) else np.zeros(0, np.int64)
    return rank[codes.indices.to_numpy(zero_copy_only=False)]


def filtered(table: pa.Table, mask: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``table.filter(mask)`` (null is false), without copying a column where the mask keeps every
    row or none: at a million rows a filter copies every string, and most of ingest's keep all."""
    import pyarrow.compute as pc

    kept = pc.sum(pc.fill_null(mask, False)).as_py() or 0
    if kept == table.num_rows:
        return table
    return table.slice(0, 0) if kept == 0 else table.filter(mask, null_selection_behavior="drop")


def _write_parquet(table: pa.Table, folder: Path, stem: str) -> str:
    """Writes ``table`` as ``<stem>-<hash of its bytes>.parquet`` in ``folder``; returns the name."""
    import pyarrow.parquet as pq

    tmp = folder / f".{stem}.parquet.partial"
    try:
        few_values = [name for name in table.column_names if name in FEW_VALUES]  # unique ones: no dictionary
        pq.write_table(
            table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd", use_dictionary=few_values
        )
        digest = hashlib.sha256()
        with open(tmp, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        name = f"{stem}-{digest.hexdigest()[:16]}.parquet"
        os.replace(tmp, folder / name)
    finally:
        if tmp.exists():
            tmp.unlink()
    return name


def save_tables(
    folder: Path,
    metadata: dict[str, Any],
    tables: dict[str, tuple[type[BaseModel], Sequence[Any]]],
    file_name: str,
) -> Path:
    """Writes each table as Parquet, then ``file_name`` (the metadata naming them), then removes
    the files an earlier save left that the new metadata no longer names."""
    import numpy as np
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    named: dict[str, dict[str, Any]] = {}
    for key, (model, rows) in tables.items():
        table = _table_of(model, rows)
        if "split" in table.column_names:  # by split (stable), so a split's rows share row groups
            table = table.append_column("position", pa.array(np.arange(table.num_rows, dtype=np.int64)))
            table = table.take(np.argsort(value_ranks(table["split"]), kind="stable"))
        named[key] = {"file": _write_parquet(table, folder, key), "rows": table.num_rows}
    path = folder / file_name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metadata | {TABLES_KEY: named}, indent=2))
    tmp.replace(path)  # the commit: readers see the old snapshot or the whole new one
    keep = {t["file"] for t in named.values()}
    for stale in folder.glob("*.parquet"):
        if stale.name.split("-")[0] in tables and stale.name not in keep:
            stale.unlink(missing_ok=True)
    return path


def saved_files(folder: Path, file_name: str) -> list[str]:
    """What a save left in ``folder``: ``file_name`` and the Parquet files it names, which it needs to
    load (none for a snapshot.json of the older, single-document format)."""
    document = json.loads((folder / file_name).read_text())
    return [file_name, *(str(info["file"]) for info in document.get(TABLES_KEY, {}).values())]


def load_tables(folder: Path, document: dict[str, Any], models: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """The metadata of a saved snapshot with each named table as lazy ``Rows`` (nothing read yet)."""
    tables = document.pop(TABLES_KEY)
    for key, model in models.items():
        info = tables[key]
        document[key] = Rows(model, path=folder / info["file"], length=int(info["rows"]))
    return document
