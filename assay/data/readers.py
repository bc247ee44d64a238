"""Streaming readers for CSV, TSV, JSONL and Parquet files.

Each reader yields :class:`Chunk` objects of at most ``chunk_rows`` records, so a file of
millions of rows is never held whole in Python objects. Every record keeps the 1-based line
number it started on (the row number for Parquet), and records that cannot be read at all
(bad encoding, a wrong number of fields, broken JSON) come back as :class:`BadRecord` with
the reason, so the caller can put them in ``rejects``.

Delimited text:
- ``.tsv`` / ``.tab`` files (or ``delimiter='\\t'``) are split on tabs with no quoting, the
  convention of TSV dumps such as WANDS, where a stray quote must not swallow lines.
- other files are parsed by the csv module with standard quoting (multi-line quoted fields
  are allowed; the record keeps the line it started on).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAW_MAX = 500  # characters of a rejected record kept in rejects.raw
# Largest CSV field accepted (Python's default is 128 KiB, less than some real product descriptions); a bigger
# field is a reject naming this limit.
CSV_FIELD_LIMIT = 16 * 1024 * 1024
csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))


@dataclass
class BadRecord:
    line: int
    reason: str
    raw: str


@dataclass
class Chunk:
    file: str
    lines: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records) + len(self.bad)


def detect_format(path: Path) -> str:
    name = path.name.lower()
    for ext in (".gz", ".bz2", ".zst"):
        if name.endswith(ext):
            raise ValueError(f"{path}: compressed files are not read directly; decompress first")
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    if name.endswith((".csv", ".txt")):
        return "csv"
    raise ValueError(f"{path}: unknown file type; use .csv, .tsv, .jsonl or .parquet")


def read_chunks(path: str | Path, chunk_rows: int = 100_000, delimiter: str | None = None) -> Iterator[Chunk]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    fmt = detect_format(path)
    if delimiter is not None and fmt in ("csv", "tsv"):
        fmt = "tsv" if delimiter == "\t" else "csv"
    if fmt == "parquet":
        yield from _parquet_chunks(path, chunk_rows)
    elif fmt == "jsonl":
        yield from _jsonl_chunks(path, chunk_rows)
    elif fmt == "tsv":
        yield from _tsv_chunks(path, chunk_rows)
    else:
        yield from _csv_chunks(path, chunk_rows, delimiter or ",")


def _decode(raw: bytes, lineno: int, bad: list[BadRecord]) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.append(BadRecord(lineno, f"bad encoding: not UTF-8 ({e.reason} at byte {e.start})",
                             raw.decode("utf-8", "replace")[:RAW_MAX]))
        return None


def _strip_bom(s: str) -> str:
    return s[1:] if s.startswith("\ufeff") else s


def _tsv_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    with open(path, "rb") as fh:
        header_raw = fh.readline()
        header = _strip_bom(header_raw.decode("utf-8", "replace")).rstrip("\r\n").split("\t")
        n = len(header)
        chunk = Chunk(str(path))
        lineno = 1
        for raw in fh:
            lineno += 1
            text = _decode(raw, lineno, chunk.bad)
            if text is None:
                continue
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            parts = text.split("\t")
            if len(parts) != n:
                chunk.bad.append(BadRecord(lineno, f"expected {n} tab-separated fields, got {len(parts)}",
                                           text[:RAW_MAX]))
            else:
                chunk.lines.append(lineno)
                chunk.records.append(dict(zip(header, parts)))
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = Chunk(str(path))
        if len(chunk):
            yield chunk


def _csv_chunks(path: Path, chunk_rows: int, delimiter: str) -> Iterator[Chunk]:
    bad_holder: list[BadRecord] = []
    counter = {"line": 0}

    def lines() -> Iterator[str]:
        with open(path, "rb") as fh:
            for raw in fh:
                counter["line"] += 1
                text = _decode(raw, counter["line"], bad_holder)
                if text is not None:
                    yield text

    it = lines()
    reader = csv.reader(it, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise ValueError(f"{path}: cannot read the header: {e}") from None
    if header:
        header[0] = _strip_bom(header[0])
    n = len(header)
    chunk = Chunk(str(path))
    start = counter["line"] + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            chunk.bad.append(BadRecord(start, f"malformed CSV: {e}", ""))
            start = counter["line"] + 1
            continue
        if bad_holder:
            chunk.bad.extend(bad_holder)
            bad_holder.clear()
        if not row or (len(row) == 1 and not row[0].strip()):
            start = counter["line"] + 1
            continue
        if len(row) != n:
            chunk.bad.append(BadRecord(start, f"expected {n} fields, got {len(row)}",
                                       delimiter.join(row)[:RAW_MAX]))
        else:
            chunk.lines.append(start)
            chunk.records.append(dict(zip(header, row)))
        start = counter["line"] + 1
        if len(chunk) >= chunk_rows:
            yield chunk
            chunk = Chunk(str(path))
    if bad_holder:
        chunk.bad.extend(bad_holder)
    if len(chunk):
        yield chunk


def _jsonl_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    with open(path, "rb") as fh:
        chunk = Chunk(str(path))
        for lineno, raw in enumerate(fh, start=1):
            text = _decode(raw, lineno, chunk.bad)
            if text is None or not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                chunk.bad.append(BadRecord(lineno, f"broken JSON: {e.msg} at column {e.colno}", text[:RAW_MAX]))
                continue
            if not isinstance(obj, dict):
                chunk.bad.append(BadRecord(lineno, f"a JSON line must be an object, got {type(obj).__name__}",
                                           text[:RAW_MAX]))
                continue
            chunk.lines.append(lineno)
            chunk.records.append(obj)
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = Chunk(str(path))
        if len(chunk):
            yield chunk


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(path))
    row = 0
    for batch in pf.iter_batches(batch_size=chunk_rows):
        chunk = Chunk(str(path))
        records = batch.to_pylist()
        chunk.lines = list(range(row + 1, row + 1 + len(records)))
        chunk.records = records
        row += len(records)
        yield chunk


def raw_of(record: dict[str, Any]) -> str:
    """A compact text form of a record for rejects.raw."""
    buf = io.StringIO()
    json.dump(record, buf, default=str, ensure_ascii=False)
    return buf.getvalue()[:RAW_MAX]
