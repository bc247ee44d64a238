"""`assay doctor`: what is wrong with a workspace, and the command that fixes each thing.

Checks, in order (each finding has a severity, a count, what it means and the fix):

- the writer lock: held by a live process (which one), or free;
- the schema version against this assay's migrations;
- runs cut off (``interrupted``: the writer died; ``running`` with no live writer) and the command that resumes them;
- mining done on a catalog, query log or engagement log that has changed since (a re-ingest);
- annotation left to do for the newest cascade: work pairs with no label, stale labels (the pair's texts changed
  after it was labeled), failed labels;
- the Ray engine's shards (``work_shards``): planned, running, finished but not committed, committed or refused,
  and the command that moves them on (`assay annotate --engine ray`);
- orphan rows: rows of ``candidates``, ``negatives``, ``engagement``, ``human_labels``, ``labels``, ``label_votes``,
  ``examples`` and ``label_requests`` that name a query or item the workspace does not hold, votes without their
  label, examples whose pair has no label at all (``--fix`` deletes orphan rows, in one transaction);
- checkpoints whose folder is gone;
- serving indexes whose folder or manifest is missing, or whose checkpoint no longer has the manifest's sha.

It opens the workspace read-only unless ``fix`` is asked, so it can run beside a writer only when none is running.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from assay.store import DB_NAME, LOCK_NAME, MIGRATIONS, Store, WorkspaceLocked, holder_pid

ORPHANS = {
    "candidates": ("query_id", "item_id"), "negatives": ("query_id", "item_id"), "engagement": ("query_id", "item_id"),
    "human_labels": ("query_id", "item_id"), "labels": ("query_id", "item_id"),
    "label_votes": ("query_id", "item_id"), "examples": ("query_id", "item_id"),
    "label_requests": ("query_id", "item_id"),
}


@dataclass
class Finding:
    check: str
    status: str  # ok | warn | error
    count: int
    detail: str
    fix: str = ""


def lock_state(root: Path) -> tuple[bool, int | None]:
    """(held, pid): whether a live process holds the workspace's writer lock."""
    path = root / LOCK_NAME
    if not path.exists():
        return False, None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    except OSError:
        return True, holder_pid(path)
    finally:
        os.close(fd)


def _cmdline(pid: int | None) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (OSError, TypeError):
        return "?"


def _orphan_sql(table: str) -> str:
    return f"""FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM queries q WHERE q.query_id = t.query_id)
               OR NOT EXISTS (SELECT 1 FROM products p WHERE p.item_id = t.item_id)"""


VOTES_WITHOUT_LABEL = """FROM label_votes v WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.query_id = v.query_id
                         AND l.item_id = v.item_id AND l.cascade_sha = v.cascade_sha)"""
EXAMPLES_WITHOUT_LABEL = """FROM examples e WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.query_id = e.query_id
                            AND l.item_id = e.item_id AND l.status = 'ok')
                            AND NOT EXISTS (SELECT 1 FROM human_labels h WHERE h.query_id = e.query_id
                            AND h.item_id = e.item_id)"""


def run(root: str | Path, *, fix: bool = False) -> dict:
    """Check the workspace at ``root``; with ``fix``, delete the orphan rows it found."""
    root = Path(root)
    if not (root / DB_NAME).exists():
        raise FileNotFoundError(f"no workspace at {root} (missing {DB_NAME})")
    found: list[Finding] = []
    held, pid = lock_state(root)
    if held:
        found.append(Finding("lock", "warn", 1, f"a writer holds the workspace: pid {pid} ({_cmdline(pid)})",
                             "wait for it to finish, or stop it (its work resumes on the next run); then run "
                             "`assay doctor` again"))
        return _summary(root, found, fixed={})
    found.append(Finding("lock", "ok", 0, "no writer is running"))
    try:
        store = Store.open(root, read_only=not fix)
    except WorkspaceLocked as e:
        found.append(Finding("lock", "warn", 1, str(e), "run `assay doctor` again when the writer ends"))
        return _summary(root, found, fixed={})
    fixed: dict[str, int] = {}
    with store:
        latest = max(m.version for m in MIGRATIONS)
        version = store.schema_version()
        found.append(Finding("schema", "ok" if version == latest else "warn", version,
                             f"schema version {version} of {latest}",
                             "" if version == latest else "`assay doctor --fix` (opening the workspace for writing "
                             "runs the migrations)"))
        stale = store.exec("""SELECT stage, count(*) FROM runs WHERE status IN ('interrupted', 'running')
                              GROUP BY stage ORDER BY stage""")
        n_stale = sum(n for _, n in stale)
        found.append(Finding("runs", "warn" if n_stale else "ok", n_stale,
                             "runs cut off: " + ", ".join(f"{s} x{n}" for s, n in stale) if stale else
                             "no run was cut off",
                             "re-run " + ", ".join(f"`assay {_command(s)}`" for s, _ in stale) +
                             " (each resumes where it stopped)" if stale else ""))
        found.extend(_guarded("annotation", _annotation, store))
        found.extend(_guarded("shards", _shards, store))
        orphans = {t: int(store.scalar(f"SELECT count(*) {_orphan_sql(t)}")) for t in ORPHANS}
        orphans["label_votes without label"] = int(store.scalar(f"SELECT count(*) {VOTES_WITHOUT_LABEL}"))
        orphans["examples without label"] = int(store.scalar(f"SELECT count(*) {EXAMPLES_WITHOUT_LABEL}"))
        n_orph = sum(orphans.values())
        found.append(Finding("orphans", "warn" if n_orph else "ok", n_orph,
                             "orphan rows: " + ", ".join(f"{t} {n:,}" for t, n in orphans.items() if n)
                             if n_orph else "no orphan rows",
                             "`assay doctor --fix` deletes them" if n_orph else ""))
        if fix and n_orph:
            with store.transaction():
                for t in ORPHANS:
                    if orphans[t]:
                        fixed[t] = orphans[t]
                        store.exec(f"DELETE FROM {t} WHERE rowid IN (SELECT t.rowid {_orphan_sql(t)})")
                if orphans["label_votes without label"]:
                    fixed["label_votes without label"] = orphans["label_votes without label"]
                    store.exec(f"DELETE FROM label_votes WHERE rowid IN (SELECT v.rowid {VOTES_WITHOUT_LABEL})")
                if orphans["examples without label"]:
                    fixed["examples without label"] = orphans["examples without label"]
                    store.exec(f"DELETE FROM examples WHERE rowid IN (SELECT e.rowid {EXAMPLES_WITHOUT_LABEL})")
        missing = [p for (p,) in store.exec("SELECT path FROM checkpoints") if not Path(p).exists()]
        found.append(Finding("checkpoints", "warn" if missing else "ok", len(missing),
                             f"{len(missing)} checkpoint folder(s) missing, e.g. {missing[0]}" if missing else
                             "every checkpoint folder exists",
                             "`assay train` (it retrains what is missing)" if missing else ""))
        found.extend(_guarded("indexes", _indexes, store))
    return _summary(root, found, fixed)


def _has_table(store: Store, name: str) -> bool:
    return bool(store.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]))


def _guarded(check: str, fn, store: Store) -> list[Finding]:
    """``fn(store)``'s findings; a check whose SQL fails is an ``error`` finding that names the error (never "ok",
    and the checks after it still run)."""
    import duckdb

    try:
        return fn(store)
    except duckdb.Error as e:
        return [Finding(check, "error", 0, f"the {check} check could not run: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}", "`assay doctor --fix` runs the migrations; if "
                        "the error stays, the workspace needs repair (report this error)")]


def _command(stage: str) -> str:
    return {"teachers": "teachers train", "audit-sample": "audit sample"}.get(stage, stage)


def _annotation(store: Store) -> list[Finding]:
    from assay.annotate.pairs import count_work
    from assay.audit.export import newest_cascade
    from assay.mining.run import stale_inputs

    found = []
    changed = stale_inputs(store)
    if changed:
        found.append(Finding("mining", "warn", len(changed), f"the candidates and negatives were mined before "
                             f"{', '.join(changed)} changed (a re-ingest)", "`assay mine` (or `assay run`)"))
    elif changed is not None:
        found.append(Finding("mining", "ok", 0, "the candidates were mined on the catalog and queries as they are"))
    try:
        sha = newest_cascade(store)
    except ValueError:
        return found + [Finding("annotation", "ok", 0, "nothing annotated yet")]
    w = count_work(store, ["candidates", "negatives"], sha)
    todo, failed, stale = w["pending"], w["failed"], w["stale"]
    status = "warn" if todo else "ok"
    return found + [Finding(
        "annotation", status, todo,
        f"cascade {sha}: {todo:,} mined pairs without a current label ({stale:,} stale: their query or item text "
        f"changed since they were labeled; {failed:,} failed and waiting for a retry)" if status == "warn" else
        f"cascade {sha}: every mined pair labeled", "`assay annotate` (labels what is new or changed, retries "
        "failed pairs)" if status == "warn" else "")]


def _shards(store: Store) -> list[Finding]:
    """The Ray engine's shards (``work_shards``) by state; running and finished are read from each shard's output
    folder (assay.scale.execute), committed from the table."""
    from assay.scale.execute import shard_state

    if not _has_table(store, "work_shards"):  # a workspace before schema v10
        return []
    rows = store.exec("SELECT plan_id, shard_id, path, state, note FROM work_shards ORDER BY plan_id, shard_id")
    if not rows:
        return []
    counts = {"planned": 0, "running": 0, "finished": 0, "committed": 0}
    refused = []
    for plan_id, shard_id, path, state, note in rows:
        st = "committed" if state == "committed" else shard_state(Path(path).parent.parent, shard_id)
        counts[st] += 1
        if note and st != "committed":
            refused.append(f"{plan_id}/{shard_id}: {note}")
    moves = {"planned": "`assay annotate --engine ray` executes them",
             "running": "a Ray job is on them, or was cut off: `assay annotate --engine ray` resumes (shards with "
                        "_SUCCESS are kept)",
             "finished": "`assay annotate --engine ray` commits them (nothing is recomputed)"}
    left = sum(counts[k] for k in moves)
    label = {"finished": "finished but not committed"}
    detail = "Ray shards: " + ", ".join(f"{n:,} {label.get(k, k)}" for k, n in counts.items())
    if refused:
        detail += f"; {len(refused)} refused at commit: " + "; ".join(refused[:3])
    fix = "; ".join(f"{k}: {m}" for k, m in moves.items() if counts[k])
    if refused:
        fix += "; refused shards: plan again (their outputs are not this plan's)"
    return [Finding("shards", "error" if refused else "warn" if left else "ok", left, detail, fix)]


def _indexes(store: Store) -> list[Finding]:
    from assay.trainer.model import checkpoint_sha

    bad = []
    for index_id, path, sha in store.exec("SELECT index_id, path, checkpoint_sha FROM indexes"):
        man = Path(path) / "manifest.json"
        if not man.exists():
            bad.append(f"{index_id}: {man} missing")
            continue
        m = json.loads(man.read_text())
        ck = Path(m.get("checkpoint_path", ""))
        if not ck.exists():
            bad.append(f"{index_id}: checkpoint {ck} is gone")
        elif checkpoint_sha(ck) != m.get("checkpoint_sha"):
            bad.append(f"{index_id}: checkpoint {ck} no longer has sha {m.get('checkpoint_sha')}")
    n = int(store.scalar("SELECT count(*) FROM indexes"))
    return [Finding("indexes", "error" if bad else "ok", len(bad), "; ".join(bad) if bad else
                    f"{n} index(es), each bound to its checkpoint", "`assay export-index`" if bad else "")]


def _summary(root: Path, found: list[Finding], fixed: dict) -> dict:
    worst = "error" if any(f.status == "error" for f in found) else "warn" if any(f.status == "warn" for f in found) \
        else "ok"
    return {"workspace": str(root), "status": worst, "findings": [asdict(f) for f in found], "fixed": fixed}
