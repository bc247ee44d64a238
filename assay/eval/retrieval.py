"""Retrieval evaluation on held-out queries: BM25, the base encoder and trained two-tower checkpoints, each
retrieving from the whole catalog, scored on judged pairs.

Queries: the ``test`` split of `assay curriculum` (held out of training and validation), or ``val``.
Judgments, in order of preference:
- a simulated world's truth (:class:`TruthOracle`): every (query, item) pair of the catalog is graded, so the ideal
  DCG is the true one and every retrieved item is judged;
- otherwise the human grades (median) and the cascade's labels of those queries: only judged pairs count, and
  judged@10 says how much of each top 10 was judged.

Dense systems encode the catalog with their item tower (cached per checkpoint sha under artifacts/embeddings/) and
search a FAISS flat inner-product index (exact, so the numbers describe the model, not the index). A multi-head
query searches with every head and re-scores the union with soft-dot attention.

Metrics (assay.eval.metrics): NDCG@10, recall@10/50/100 of grade >= 3, the embarrassing rate@10 (grade-0 share of
the judged top 10) and judged@10; overall and by query segment (head / torso / tail).

Comparisons: the reference system (the curriculum model by default) against every other system on the same
queries: the mean per-query difference of NDCG@10, the embarrassing rate@10 and recall@100, with a paired
bootstrap confidence interval over queries, overall and per segment. With a couple of hundred held-out queries,
differences of a few thousandths of NDCG are usually inside the interval; the interval says which are not.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from assay.config import BM25Config, SpellConfig
from assay.eval.metrics import aggregate, query_metrics
from assay.store import Store


log = logging.getLogger(__name__)

K = 100
COMPARED = ("ndcg@10", "embarrassing@10", "recall@100")


def eval_queries(store: Store, split: str) -> tuple[list[str], list[str], list[str]]:
    if split not in ("test", "val"):
        raise ValueError(f"split must be test or val, got {split!r}")
    rows = store.exec("""SELECT DISTINCT e.query_id, q.text, coalesce(q.segment, 'unknown') FROM examples e
                         JOIN queries q USING (query_id) WHERE e.split = ? ORDER BY 1""", [split])
    if not rows:
        raise ValueError(f"no {split} queries: run `assay curriculum` (curriculum.test_fraction > 0) first")
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Graded judgments from a TREC qrels file (``query_id 0 item_id grade`` per line, whitespace-separated) or a
    CSV/TSV with ``query_id, item_id, grade`` columns. Grades must be integers 0-4; a bad line is an error that
    names the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"qrels file {path} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    out: dict[str, dict[str, int]] = {}
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    header = [c.strip().lower() for c in lines[0].split(sep)] if lines else []
    csv_mode = {"query_id", "item_id", "grade"} <= set(header)
    for n, line in enumerate(lines[1:] if csv_mode else lines, start=2 if csv_mode else 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(sep)] if csv_mode else line.split()
        try:
            if csv_mode:
                q, i, g = (parts[header.index(c)] for c in ("query_id", "item_id", "grade"))
            else:
                q, _, i, g = parts[:4]
            grade = int(float(g))
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{n}: expected 'query_id 0 item_id grade' (TREC) or query_id,item_id,grade "
                             f"(CSV with a header), got {line[:80]!r}") from None
        if not 0 <= grade <= 4:
            raise ValueError(f"{path}:{n}: grade {grade} is outside 0-4")
        out.setdefault(q, {})[i] = grade
    if not out:
        raise ValueError(f"qrels file {path} holds no judgments")
    return out


def judgments(store: Store, query_ids: list[str], item_ids: np.ndarray,
              qrels: Path | None = None) -> tuple[str, dict[str, dict[str, int]]]:
    """(source, {query_id: {item_id: grade}}). With truth, every item with grade >= 1 is listed; grade-0 items are
    added for whatever a system retrieves. A qrels file, when given, is used instead of anything the workspace
    holds."""
    from assay.data.judgments import load_oracle

    if qrels is not None:
        given = read_qrels(qrels)
        return f"qrels ({Path(qrels).name})", {q: given.get(q, {}) for q in query_ids}

    oracle = load_oracle(store)
    if oracle is not None:
        out = {}
        for q in query_ids:
            g = oracle.grade(np.array([q] * len(item_ids), dtype=object), item_ids)
            nz = np.flatnonzero(g > 0)
            out[q] = dict(zip(item_ids[nz].tolist(), g[nz].astype(int).tolist()))
        return "truth", out
    from assay.curriculum.run import labeled_pairs_sql

    tbl = store.query(f"SELECT query_id, item_id, grade FROM ({labeled_pairs_sql()}) WHERE grade IS NOT NULL "
                      "AND query_id IN (SELECT unnest(?::VARCHAR[]))", [query_ids])
    out: dict[str, dict[str, int]] = {q: {} for q in query_ids}
    for q, i, g in zip(*(tbl.column(c).to_pylist() for c in ("query_id", "item_id", "grade"))):
        out[q][i] = int(g)
    return "labels", out


def _dense_hits(model, catalog, query_texts: list[str], artifacts: Path, k: int, stats: dict | None = None
                ) -> np.ndarray:
    """Exact top-k rows of the catalog for each query: the serving path (cached item vectors, flat index,
    soft-dot re-scoring for multi-head queries) with an exact index, so the numbers describe the model.
    ``stats`` (optional) gets how many catalog vectors were read from the cache and how many were encoded."""
    from assay.dense import exact_search, item_vectors, query_vectors

    vecs = item_vectors(model, catalog.texts, artifacts, chunk=16384, progress=False, stats=stats)
    return exact_search(vecs, query_vectors(model, query_texts), k, model.beta)[1]


def rrf(a: list[str], b: list[str], k: int, c: int = 60) -> list[str]:
    """Reciprocal-rank fusion of two ranked id lists, duplicates merged, the top ``k``."""
    score: dict[str, float] = {}
    for ranked in (a, b):
        for r, i in enumerate(ranked):
            score[i] = score.get(i, 0.0) + 1.0 / (c + r + 1)
    return sorted(score, key=lambda i: (-score[i], i))[:k]


def evaluate(store: Store, systems: dict[str, str | None], *, split: str = "test", bm25: BM25Config | None = None,
             base_model: str = "all-MiniLM-L6-v2", k: int = K, device: str = "cpu", progress: bool = True,
             hybrid: tuple[str, str] | None = None, qrels: Path | None = None, backend_cfg=None,
             spell: SpellConfig | None = None, reference: str | None = None, bootstrap: int = 2000,
             confidence: float = 0.95, seed: int = 5) -> dict:
    """systems: name -> checkpoint path; the values ``"bm25"`` and ``"base"`` name BM25 and the base encoder.
    ``hybrid`` = (sparse system, dense system): also score their reciprocal-rank fusion as ``hybrid``.
    ``backend_cfg`` (an AssayConfig): dense systems run on its ``models.backend``, as `assay export-index` would
    serve them (the accuracy guard included); None = PyTorch. ``spell``: every system searches with the query text
    corrected by the catalog's speller (assay/spell.py); None or disabled = the text as typed. ``reference``:
    the system the others are compared with (``comparisons``; ``bootstrap`` resamples, 0 = no comparison);
    None = ``curriculum`` when evaluated, else ``base encoder``."""
    from assay.mining.run import bm25_index, load_catalog
    from assay.trainer.model import TwoTower

    if reference is not None and reference not in set(systems) | ({"hybrid"} if hybrid else set()):
        raise ValueError(f"evaluate.reference {reference!r} is not an evaluated system; systems: "
                         f"{list(systems) + (['hybrid'] if hybrid else [])}")
    qids, qtexts, segments = eval_queries(store, split)
    catalog = load_catalog(store)
    from assay.spell import build

    speller = build(spell, base_model, texts=catalog.texts)
    corrected = 0
    if speller is not None:
        fixed = speller.correct_many(qtexts)
        corrected = sum(a != b for a, b in zip(fixed, qtexts))
        qtexts = fixed
    source, judged = judgments(store, qids, catalog.item_ids, qrels)
    results: dict = {}
    per_query: dict[str, list[dict]] = {}
    ranked_of: dict[str, list[list[str]]] = {}
    for name, what in systems.items():
        t0 = time.perf_counter()
        if what == "bm25":
            index, _ = bm25_index(store, catalog, bm25 or BM25Config(), progress=progress)
            hits = index.search(qtexts, k, threads=store.compute_threads).idx
        else:
            from assay.dense import open_backend, open_base_encoder

            if what == "base":
                model, guard = open_base_encoder(base_model, store, catalog.texts, backend_cfg, device)
            else:
                model = TwoTower.load(what, device=device)
                guard = open_backend(model, backend_cfg, store, catalog.texts) if backend_cfg is not None else None
            vec_stats: dict = {}
            hits = _dense_hits(model, catalog, qtexts, store.artifacts, k, vec_stats)
        ranked_of[name] = [catalog.item_ids[hits[r][hits[r] >= 0]].tolist() for r in range(len(qids))]
        results[name], per_query[name] = _score(ranked_of[name], qids, judged, source, segments, t0)
        if what != "bm25":
            results[name]["item_vectors"] = vec_stats
            if guard is not None:
                results[name]["backend"] = guard
        log.info("%s: NDCG@10 %.4f on %d %s queries", name, results[name]["all"]["ndcg@10"], len(qids), split)
    if hybrid and all(h in ranked_of for h in hybrid):
        t0 = time.perf_counter()
        fused = [rrf(a, b, k) for a, b in zip(ranked_of[hybrid[0]], ranked_of[hybrid[1]])]
        summary, per_query["hybrid"] = _score(fused, qids, judged, source, segments, t0)
        results["hybrid"] = {**summary, "of": list(hybrid)}
    seg_names, seg_counts = np.unique(segments, return_counts=True)
    backends = {n: r["backend"]["backend"] for n, r in results.items() if "backend" in r}
    ref = reference or ("curriculum" if "curriculum" in results else "base encoder")
    comparisons = compare(per_query, ref, segments, n_boot=bootstrap, confidence=confidence, seed=seed) \
        if bootstrap and ref in results else {}
    return {"split": split, "queries": len(qids), "judgments": source,
            "spell": {"enabled": speller is not None, "corrected_queries": corrected},
            "segments": {str(s): int(c) for s, c in zip(seg_names, seg_counts)}, "systems": results,
            "backends": backends, "backend_note": mixed_backends(backends),
            "reference": ref if comparisons else None, "confidence": confidence, "comparisons": comparisons,
            "per_query": {"query_id": qids, "segment": list(segments),
                          **{f"{n}|{m}": [r.get(m) for r in rows] for n, rows in per_query.items() for m in COMPARED}}}


def mixed_backends(backends: dict[str, str]) -> str | None:
    """A warning when the dense systems were searched on different encoder backends (None when they were not).

    Under ``models.backend: auto`` each model is tried as int8 first and falls back to fp32 ONNX when it fails the
    accuracy guard, so two models of one workspace can end up on different backends, and their difference then
    includes the backend's (a few thousandths of NDCG@10 where we measured it)."""
    by: dict[str, list[str]] = {}
    for name, backend in backends.items():
        by.setdefault(backend, []).append(name)
    if len(by) < 2:
        return None
    parts = "; ".join(f"{b}: {', '.join(names)}" for b, names in by.items())
    fixed = "onnx" if "onnx" in by else next(iter(by))
    return (f"the dense systems were searched on different encoder backends ({parts}), so their differences include "
            f"the backend's; to compare them on one, run again with -s models.backend={fixed}")


def compare(per_query: dict[str, list[dict]], reference: str, segments: list[str], *, n_boot: int,
            confidence: float, seed: int) -> dict:
    """{system: {segment: {metric: paired bootstrap of reference minus system}}} for every system other than the
    reference; segments: all, then each segment with at least 2 queries."""
    from assay.eval.metrics import paired_bootstrap

    seg = np.asarray(segments, dtype=object)
    groups = {"all": np.ones(len(seg), dtype=bool)}
    groups.update({str(s): seg == s for s in dict.fromkeys(segments) if (seg == s).sum() >= 2})
    cols = {(name, m): np.array([np.nan if r.get(m) is None else float(r[m]) for r in rows])
            for name, rows in per_query.items() for m in COMPARED}
    return {name: {g: {m: paired_bootstrap(cols[reference, m][mask], cols[name, m][mask], n_boot=n_boot,
                                           confidence=confidence, seed=seed) for m in COMPARED}
                   for g, mask in groups.items()}
            for name in per_query if name != reference}


def _score(ranked_lists: list[list[str]], qids: list[str], judged: dict, source: str, segments: list[str],
           t0: float) -> dict:
    per_q = []
    for ranked, q in zip(ranked_lists, qids):
        j = judged[q]
        if source == "truth":  # every catalog item is graded: unlisted retrieved items are grade 0
            j = {**{i: 0 for i in ranked if i not in j}, **j}
        per_q.append(query_metrics(ranked, j, ks=(10, 50, 100)))
    return {**aggregate(per_q, segments), "seconds": round(time.perf_counter() - t0, 1)}, per_q
