"""Reading an ingest manifest: CSV or JSONL rows naming an image (``uri`` or ``path``), its ``label``
and optionally its ``sha256``, as Arrow columns a batch of rows at a time.

pyarrow reads the file in C++; where it refuses (invalid UTF-8, a ragged row, a quoted newline, a
label that is a JSON number...) the Python reader reads it row by row as ingest always did, and names
the problem where there is one.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from adaptflow.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST_COLUMNS = ("uri", "path", "label", "sha256")


def _manifest_rows(path: Path) -> Iterator[dict[str, object]]:
    try:
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as error:
                            raise DataError(f"{path}:{number}: not valid JSON: {error}") from None
                        if not isinstance(row, dict):
                            raise DataError(
                                f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
                            )
                        yield row
        else:
            with open(path, newline="", encoding="utf-8") as handle:
                yield from csv.DictReader(handle)
    except UnicodeDecodeError as error:
        raise DataError(f"manifest {path} is not valid UTF-8: {error}", hint="save it as UTF-8") from None


def read_with_arrow(path: Path) -> pa.Table | None:
    """The manifest's columns, read by pyarrow; None where it refuses the file (invalid UTF-8, a
    ragged row, a quoted newline, a label that is a JSON number...): the Python reader then reads it
    as it always did, and names the problem where there is one."""
    import pyarrow as pa

    schema = pa.schema([(name, pa.string()) for name in MANIFEST_COLUMNS])
    try:
        if path.suffix.lower() == ".jsonl":
            import pyarrow.json as pajson

            options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
            table = pajson.read_json(path, parse_options=options)
        else:
            import pyarrow.csv as pacsv

            convert = pacsv.ConvertOptions(
                column_types=schema, include_columns=list(MANIFEST_COLUMNS), include_missing_columns=True
            )
            table = pacsv.read_csv(path, convert_options=convert)
    except (pa.ArrowException, OSError):
        return None
    return table.select(list(MANIFEST_COLUMNS)).cast(schema)


def manifest_batches(path: Path, rows_per_batch: int) -> Iterator[tuple[pa.Array, pa.Array, pa.Array]]:
    """(image, label, sha256 or null) per batch of rows, stripped; the image is ``uri`` or ``path``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = read_with_arrow(path)
    if table is None:
        rows = iter(_manifest_rows(path))
        while batch := list(itertools.islice(rows, rows_per_batch)):
            raw = [str(row.get("uri") or row.get("path") or "").strip() for row in batch]
            label = [str(row.get("label") or "").strip() for row in batch]
            sha = [str(row.get("sha256") or "").strip().lower() or None for row in batch]
            yield pa.array(raw, pa.string()), pa.array(label, pa.string()), pa.array(sha, pa.string())
        return
    for part in table.to_batches(max_chunksize=rows_per_batch):
        uri, other, label, sha = (pc.fill_null(part[name], "") for name in MANIFEST_COLUMNS)
        raw = pc.utf8_trim_whitespace(pc.if_else(pc.equal(pc.utf8_length(uri), 0), other, uri))
        sha = pc.ascii_lower(pc.utf8_trim_whitespace(sha))  # hex digits: ASCII, or a mismatch anyway
        sha = pc.if_else(pc.equal(pc.utf8_length(sha), 0), pa.scalar(None, pa.string()), sha)
        yield raw, pc.utf8_trim_whitespace(label), sha
