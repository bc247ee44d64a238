"""The workspace store: one DuckDB file plus an ``artifacts/`` folder.

Layout of a workspace directory::

    WORKSPACE/
      assay.duckdb      all tables (schemas in assay.records), versioned by migrations
      assay.lock        held (flock) by the single writer process; holds its pid
      artifacts/        indexes, checkpoints, embeddings caches, reports

Contract:
- Only one writer process at a time. A second writer gets
  ``WorkspaceLocked("workspace ... is locked by pid N ...")`` before it touches the file.
- Every write runs inside a transaction (:meth:`Store.transaction`); a crash mid-write
  rolls back on the next open and leaves the previous state readable.
- Tables move in and out as Arrow (record batches for millions of rows) and Parquet.
- Every stage run is recorded in ``runs`` (config, code version, models, start/end, summary).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from assay import __version__
from assay.records import get_schema
from assay.text import digest, stamp_text_sha_sql

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"^(?:.*[_-])?(?:api[_-]?key|token|secret|password|passwd|authorization|credentials?|bearer)$",
                         re.I)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
_URL_SECRET_PARAM = re.compile(r"(?P<k>(?:^|[?&;\s\"'])(?:api[_-]?key|key|token|access_token|sig|signature|password|"
                               r"secret)=)[^&#\s\"']+", re.I)
# an Authorization header's value (with its scheme word kept), then any "Bearer <token>" left in free text
_AUTH_VALUE = re.compile(r"(?P<k>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)"
                         r"[^\s,;\"'}\]]+", re.I)
_BEARER = re.compile(r"(?P<k>\bbearer\s+)[^\s,;\"'}\]]+", re.I)
REDACTED = "***"


def redact_text(text: str) -> str:
    """``text`` with secrets replaced by ***: URL userinfo (``user:password@``), the values of ``api_key=``,
    ``token=``, ``key=``, ``access_token=``, ``sig=``, ``password=``, ``secret=`` parameters, Authorization header
    values and ``Bearer <token>`` strings. The one redaction assay applies to everything it records, logs or
    prints (runs, summaries, errors from endpoints, `assay config show`)."""
    if not isinstance(text, str) or not text:
        return text
    out = _URL_CREDENTIALS.sub(rf"\g<scheme>{REDACTED}@", text) if "://" in text else text
    if "=" in out:
        out = _URL_SECRET_PARAM.sub(rf"\g<k>{REDACTED}", out)
    low = out.lower()
    if "authorization" in low:
        out = _AUTH_VALUE.sub(rf"\g<k>{REDACTED}", out)
    if "bearer" in low:
        out = _BEARER.sub(rf"\g<k>{REDACTED}", out)
    return out


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (config, summary) safe to record: values of secret-named keys (api_key, token, password,
    secret, authorization ...) are replaced by ***, and every other string goes through :func:`redact_text`."""
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and _SECRET_KEY.match(k) and isinstance(v, str) and v
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that puts every record's message (and its formatted exception) through :func:`redact_text`.
    ``assay.cli`` installs it on its log handler, so nothing a library logs reaches the terminal unredacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError) as e:  # a bad format string: log what we can, say why
            msg = f"{record.msg!r} (unformattable log arguments: {e})"
        red = redact_text(msg)
        if red != msg or record.args:
            record.msg, record.args = red, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = str(exc)
            if redact_text(text) != text:  # keep the type, drop the secret-bearing traceback text
                record.msg = f"{record.msg}: {type(exc).__name__}: {redact_text(text)}"
                record.exc_info, record.exc_text = None, None
        return True


DB_NAME = "assay.duckdb"
LOCK_NAME = "assay.lock"


class WorkspaceLocked(RuntimeError):
    """Raised when another process holds the workspace's write lock."""


class WorkspaceMissing(FileNotFoundError):
    """Raised when a read-only open finds no workspace."""


# --------------------------------------------------------------------------- migrations
@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    tables: tuple[str, ...] = ()
    sql: tuple[str, ...] = ()


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "core tables", ("products", "queries", "engagement", "human_labels", "rejects", "runs", "meta")),
    Migration(2, "simulated world truth", ("truth_items", "truth_queries")),
    Migration(3, "mining", ("candidates", "negatives", "mining_progress", "channel_hits")),
    Migration(4, "annotation", ("labels", "label_votes")),
    Migration(5, "curriculum, training and serving", ("examples", "checkpoints", "indexes")),
    Migration(6, "example grades, checkpoint names and steps", sql=(
        "ALTER TABLE examples ADD COLUMN IF NOT EXISTS grade TINYINT",
        "ALTER TABLE examples ADD COLUMN IF NOT EXISTS grade_source VARCHAR",
        "ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS name VARCHAR",
        "ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS step INTEGER",
        "ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS created_at TIMESTAMP",
    )),
    Migration(7, "label requests", ("label_requests",)),
    Migration(8, "audit samples and their design weights", ("audit_samples",)),
    # labels written before v9 are taken to have judged the texts the workspace holds at migration time
    Migration(9, "labels and votes bound to the texts they judged", sql=(
        "ALTER TABLE labels ADD COLUMN IF NOT EXISTS text_sha VARCHAR",
        "ALTER TABLE label_votes ADD COLUMN IF NOT EXISTS text_sha VARCHAR",
        stamp_text_sha_sql("labels"),
        stamp_text_sha_sql("label_votes"),
    )),
    Migration(10, "work shards of the Ray engine", ("work_shards",)),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def code_version() -> str:
    """The package version plus the git commit when running from a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


_now = utcnow


def new_run_id(stage: str) -> str:
    return f"{stage}-{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- lock
class _WriterLock:
    """An exclusive advisory lock on WORKSPACE/assay.lock, released when the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkspaceLocked(
                    f"workspace {self.path.parent} is locked by pid {holder_pid(self.path) or '?'}; "
                    "only one writer may run at a time. Wait for it to finish or stop it."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder_pid(lock_path: Path) -> int | None:
    try:
        text = lock_path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- store
class Store:
    """A workspace. Open with :meth:`open`; use as a context manager.

    >>> with Store.open("ws") as store:                                # doctest: +SKIP
    ...     store.write("products", table, mode="upsert")
    ...     store.count("products")
    """

    def __init__(self, root: Path, con: duckdb.DuckDBPyConnection, lock: _WriterLock | None, threads: int):
        self.root = root
        self.con = con
        self._lock = lock
        self.threads = threads
        self._in_tx = False

    # ---- open / close
    @classmethod
    def open(cls, root: str | Path, *, read_only: bool = False, threads: int | None = None,
             memory_limit: str | None = None) -> "Store":
        root = Path(root)
        threads = threads or min(os.cpu_count() or 1, 4)
        db = root / DB_NAME
        lock = None
        if read_only:
            if not db.exists():
                raise WorkspaceMissing(
                    f"no workspace at {root} (missing {DB_NAME}); create one with `assay ingest` or `assay simulate`"
                )
            try:
                con = duckdb.connect(str(db), read_only=True)
            except duckdb.IOException as e:
                if "lock" in str(e).lower():
                    raise WorkspaceLocked(
                        f"workspace {root} is locked by pid {holder_pid(root / LOCK_NAME) or '?'} (a writer is "
                        "running); read it again when that run ends"
                    ) from None
                raise
        else:
            root.mkdir(parents=True, exist_ok=True)
            (root / "artifacts").mkdir(exist_ok=True)
            lock = _WriterLock(root / LOCK_NAME)
            lock.acquire()
            try:
                con = duckdb.connect(str(db))
            except Exception:
                lock.release()
                raise
        con.execute(f"SET threads = {int(threads)}").fetchall()
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit}'").fetchall()
        store = cls(root, con, lock, threads)
        if not read_only:
            store.migrate()
            # we hold the only write lock, so a run still marked running was cut off (crash, kill -9)
            store.exec("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
        return store

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def read_only(self) -> bool:
        return self._lock is None

    @property
    def compute_threads(self) -> int:
        """Threads for torch, faiss and numba work: store.threads, capped by OMP_NUM_THREADS /
        NUMBA_NUM_THREADS when set (they share one OpenMP runtime; mixing counts oversubscribes)."""
        caps = [int(v) for v in (os.environ.get("OMP_NUM_THREADS"), os.environ.get("NUMBA_NUM_THREADS")) if v]
        return max(1, min([self.threads, *caps]))

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    # ---- schema
    def schema_version(self) -> int:
        try:
            row = self.exec("SELECT max(version) FROM schema_migrations")[0]
        except duckdb.CatalogException:
            return 0
        return int(row[0] or 0)

    def migrate(self) -> list[int]:
        """Apply pending migrations, each in its own transaction. Returns the versions applied."""
        self.exec(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER, description VARCHAR, applied_at TIMESTAMP)"
        )
        current = self.schema_version()
        applied = []
        for m in MIGRATIONS:
            if m.version <= current:
                continue
            with self.transaction():
                for name in m.tables:
                    self.exec(get_schema(name).ddl())
                for stmt in m.sql:
                    self.exec(stmt)
                self.exec("INSERT INTO schema_migrations VALUES (?, ?, ?)", [m.version, m.description, _now()])
            applied.append(m.version)
        if applied:
            log.info("workspace %s migrated to schema v%d", self.root, applied[-1])
        return applied

    # ---- transactions
    @contextlib.contextmanager
    def transaction(self) -> Iterator["Store"]:
        """All writes inside commit together or not at all. Nested use joins the outer transaction."""
        self._require_writer()
        if self._in_tx:
            yield self
            return
        self.exec("BEGIN TRANSACTION")
        self._in_tx = True
        try:
            yield self
        except BaseException:
            self._in_tx = False
            self.exec("ROLLBACK")
            raise
        self._in_tx = False
        self.exec("COMMIT")

    def _require_writer(self) -> None:
        if self.read_only:
            raise PermissionError(f"workspace {self.root} was opened read-only")

    # ---- typed write / read
    def write(self, table: str, data: pa.Table | pa.RecordBatch, *, mode: str = "append") -> int:
        """Write an Arrow table into a workspace table.

        mode: ``append`` adds rows; ``upsert`` first deletes rows with the same key; ``replace``
        empties the table first. Columns are matched by name; missing nullable columns are null.
        """
        schema = get_schema(table)
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        unknown = [c for c in data.column_names if c not in schema.column_names]
        if unknown:
            raise ValueError(f"table {table!r} has no column(s) {unknown}; columns are {schema.column_names}")
        if mode not in ("append", "upsert", "replace"):
            raise ValueError(f"unknown write mode {mode!r}; use append, upsert or replace")
        if mode == "upsert" and not schema.key:
            raise ValueError(f"table {table!r} has no key; use mode='append'")
        cols = data.column_names
        view = f"_incoming_{uuid.uuid4().hex[:8]}"
        with self.transaction():
            self.con.register(view, data)
            try:
                if mode == "replace":
                    self.exec(f"DELETE FROM {table}")
                elif mode == "upsert":
                    cond = " AND ".join(f"{table}.{k} IS NOT DISTINCT FROM {view}.{k}" for k in schema.key)
                    self.exec(f"DELETE FROM {table} USING {view} WHERE {cond}")
                collist = ", ".join(cols)
                self.exec(f"INSERT INTO {table} ({collist}) SELECT {collist} FROM {view}")
            finally:
                self.con.unregister(view)
        return data.num_rows

    def exec(self, sql: str, params: list | None = None) -> list[tuple]:
        """Run a statement and fetch its whole result (DuckDB 2 wants results finished before the
        next statement on the connection)."""
        return self.con.execute(sql, params or []).fetchall()

    def scalar(self, sql: str, params: list | None = None) -> Any:
        rows = self.exec(sql, params)
        return rows[0][0] if rows else None

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        """Run SQL and return the result as an Arrow table."""
        rel = self.con.sql(sql, params=params or None)
        if rel is None:  # not a SELECT
            return pa.table({})
        # DuckDB >= 2.0 names it to_arrow_table; 1.x arrow()
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()

    def iter_batches(self, sql: str, params: list | None = None, batch_size: int = 100_000) -> Iterator[pa.RecordBatch]:
        """Stream a query's result as Arrow record batches."""
        rel = self.con.sql(sql, params=params or None)
        if hasattr(rel, "to_arrow_reader"):
            yield from rel.to_arrow_reader(batch_size)
        else:
            yield from rel.record_batch(batch_size)

    def read(self, table: str, columns: list[str] | None = None, where: str = "", params: list | None = None) -> pa.Table:
        get_schema(table)
        cols = ", ".join(columns) if columns else "*"
        sql = f"SELECT {cols} FROM {table}" + (f" WHERE {where}" if where else "")
        return self.query(sql, params)

    def count(self, table: str, where: str = "", params: list | None = None) -> int:
        get_schema(table)
        sql = f"SELECT count(*) FROM {table}" + (f" WHERE {where}" if where else "")
        return int(self.exec(sql, params or [])[0][0])

    def export_parquet(self, table_or_sql: str, path: str | Path) -> Path:
        """Write a table (or a SELECT) to a Parquet file, streamed by DuckDB."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        src = table_or_sql if table_or_sql.lstrip().lower().startswith("select") else f"SELECT * FROM {get_schema(table_or_sql).name}"
        self.exec(f"COPY ({src}) TO '{_sql_str(path)}' (FORMAT parquet)")
        return path

    def import_parquet(self, table: str, path: str | Path, *, mode: str = "append") -> int:
        """Load a Parquet file into a table, streamed in record batches. Columns the table does
        not know are ignored (reported in the log)."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(path))
        known = set(get_schema(table).column_names)
        cols = [c for c in pf.schema_arrow.names if c in known]
        ignored = [c for c in pf.schema_arrow.names if c not in known]
        if ignored:
            log.info("%s: columns %s are not in table %s and were not loaded", path, ignored, table)
        total = 0
        with self.transaction():
            if mode == "replace":
                self.exec(f"DELETE FROM {table}")
            for batch in pf.iter_batches(batch_size=200_000, columns=cols):
                total += self.write(table, batch, mode="append" if mode == "replace" else mode)
        return total

    def fingerprint(self, *tables: str) -> str:
        """A digest of the contents of whole tables: row count and an order-independent hash of every row's
        values (the columns that only say which run or file wrote a row, run_id, source and created_at, left out),
        so re-ingesting an unchanged file keeps it and any edited, added or removed row changes it."""
        parts = []
        for t in tables:
            cols = [c for c in get_schema(t).column_names if c not in ("run_id", "source", "created_at")]
            n, h = self.exec(f"SELECT count(*), bit_xor(hash({', '.join('x.' + c for c in cols)})) FROM {t} x")[0]
            parts.append(f"{t}:{n}:{h}")
        return digest(parts)

    # ---- meta
    def set_meta(self, key: str, value: Any) -> None:
        self.write("meta", pa.table({"key": [key], "value": [json.dumps(value)]}), mode="upsert")

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self.exec("SELECT value FROM meta WHERE key = ?", [key])
        return json.loads(rows[0][0]) if rows else default

    # ---- runs
    def start_run(self, stage: str, config: dict | None = None, models: dict | None = None) -> str:
        run_id = new_run_id(stage)
        self.write("runs", pa.table({
            "run_id": [run_id], "stage": [stage], "config": [json.dumps(redact(config or {}), default=str)],
            "code_version": [code_version()], "models": [json.dumps(redact(models or {}), default=str)],
            "started_at": [_now()], "status": ["running"], "pid": [os.getpid()],
        }))
        return run_id

    def finish_run(self, run_id: str, summary: dict | None = None, status: str = "ok",
                   models: dict | None = None) -> None:
        with self.transaction():
            self.exec(
                "UPDATE runs SET ended_at = ?, status = ?, summary = ? WHERE run_id = ?",
                [_now(), status, json.dumps(redact(summary or {}), default=str), run_id],
            )
            if models is not None:
                self.exec("UPDATE runs SET models = ? WHERE run_id = ?",
                          [json.dumps(redact(models), default=str), run_id])

    @contextlib.contextmanager
    def run(self, stage: str, config: dict | None = None, models: dict | None = None) -> Iterator[str]:
        """Record a stage run: yields its run_id; marks it ok, or failed with the error."""
        run_id = self.start_run(stage, config, models)
        try:
            yield run_id
        except BaseException as e:
            try:
                self.finish_run(run_id, {"error": f"{type(e).__name__}: {e}"}, status="failed")
            except Exception as rec:  # the stage's own error is the one to raise; say why it was not recorded
                log.warning("run %s (%s) failed, and recording the failure failed too: %s: %s", run_id, stage,
                            type(rec).__name__, redact_text(str(rec)))
            raise
        if self.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "running":
            self.finish_run(run_id)

    # ---- rejects
    def reject(self, rows: pa.Table) -> int:
        """Append reject rows (target, file, line, reason, raw, run_id)."""
        if rows.num_rows == 0:
            return 0
        if "created_at" not in rows.column_names:
            rows = rows.append_column("created_at", pa.array([_now()] * rows.num_rows, pa.timestamp("us")))
        return self.write("rejects", rows)


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")
