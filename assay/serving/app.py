"""`assay serve`: the search API and a search page, one process holding the query tower and the index.

Endpoints:
- ``POST /search`` ``{"query": str, "k": 1-1000, "mode": "dense" | "hybrid"}`` -> the query as searched (spelling
  corrected against the catalog, assay/spell.py), the hits (item id, title, score,
  source) and the time taken; an empty or oversized query, k outside [1, 1000] or an unknown mode get 422 with the
  reason;
- ``GET /health`` -> status, index id, items, checkpoint sha;
- ``GET /manifest`` -> the index manifest;
- ``GET /compare?q=...&k=10`` -> BM25, the base encoder and the trained model side by side, each hit with its grade
  when the workspace holds one for that query text (cascade label, or human median);
- ``GET /`` -> a small page with one query box that shows those three columns (``GET /?q=...`` opens with that
  query's comparison, a link to share).

Access: when the environment variable named by ``serve.api_token_env`` (``ASSAY_API_TOKEN``) holds a token, every
endpoint except ``/health`` (the page, ``/docs`` and ``/openapi.json`` included) answers 401 unless the request
carries ``Authorization: Bearer <token>``. Binding to an interface other than loopback prints a warning (and says
whether a token is required). ``/manifest`` shows file paths relative to the workspace, not the server's layout.

The app refuses to start when the index manifest does not match its checkpoint (assay.serving.index.Served). The
workspace is opened read-only. The base encoder runs on ``models.backend`` with its accuracy guard, as `assay evaluate`
runs it, so its catalog vectors come from the embedding cache evaluate filled (before, it ran on PyTorch, whose
vectors are cached under another key: the first comparison encoded the whole catalog again, which made the server
test's call 44 s for 3,000 items on one core); in a workspace no evaluation has seen they are encoded once, at the
first comparison (the guard reads the workspace read-only).
"""

# no `from __future__ import annotations` here: FastAPI reads the request model from the real annotation

import hmac
import html
import ipaddress
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from assay.config import AssayConfig
from assay.dense import item_vectors, open_base_encoder, search_index
from assay.serving.index import MODES, Served
from assay.store import Store

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health"})  # answered without the bearer token

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>assay search</title>
<style>body{font-family:sans-serif;margin:1.5em}#cols{display:flex;gap:1em}.col{flex:1;min-width:0}
.col h2{font-size:1.05em}ol{padding-left:1.4em}li{margin:.35em 0}.meta{color:#666;font-size:.85em}
.g0{color:#b00}.g3,.g4{color:#070}input{width:40em;font-size:1.1em}</style></head>
<body><h1>assay search</h1>
<form id="f"><input id="q" name="q" placeholder="search the catalog" autofocus> <button>search</button></form>
<p class="meta">index __INDEX__ &middot; checkpoint __SHA__ &middot; __N__ items</p>
<p id="searched" class="meta"></p>
<div id="cols"></div>
<script>
const f = document.getElementById('f');
f.addEventListener('submit', (e) => { e.preventDefault(); show(document.getElementById('q').value); });
async function show(q) {
  history.replaceState(null, '', '/?q=' + encodeURIComponent(q));  // a link to this comparison
  const r = await fetch('/compare?k=10&q=' + encodeURIComponent(q));
  const data = await r.json();
  const cols = document.getElementById('cols');
  cols.innerHTML = '';
  if (!r.ok) { cols.textContent = JSON.stringify(data.detail); return; }
  document.getElementById('searched').textContent =
    data.searched && data.searched !== data.query ? 'searched as: ' + data.searched : '';
  for (const sys of data.systems) {
    const div = document.createElement('div'); div.className = 'col'; div.dataset.system = sys.name;
    const h = document.createElement('h2'); h.textContent = sys.name; div.appendChild(h);
    const ol = document.createElement('ol');
    for (const hit of sys.hits) {
      const li = document.createElement('li');
      const g = hit.grade === null ? '' : ' grade ' + hit.grade;
      li.innerHTML = '<span class="title"></span><div class="meta g' + hit.grade + '"></div>';
      li.querySelector('.title').textContent = hit.title;
      li.querySelector('.meta').textContent = hit.score.toFixed(4) + ' ' + hit.source + g;
      ol.appendChild(li);
    }
    div.appendChild(ol); cols.appendChild(div);
  }
  cols.dataset.query = q;
}
const q0 = new URLSearchParams(location.search).get('q');
if (q0) { document.getElementById('q').value = q0; show(q0); }
</script></body></html>
"""


class _Base:
    """The base encoder over the catalog, for the page's middle column (built on first use)."""

    def __init__(self, cfg: AssayConfig, store: Store, served: Served):
        self.cfg, self.store, self.served = cfg, store, served
        self._lock = threading.Lock()
        self._ready = None

    def get(self):
        with self._lock:
            if self._ready is None:
                import faiss

                catalog = self.served.catalog
                model, _ = open_base_encoder(self.cfg.train.base_model or self.cfg.models.embedder, self.store,
                                             catalog.texts, self.cfg, self.cfg.models.device)
                vecs = item_vectors(model, catalog.texts, self.store.artifacts, self.cfg.serve.encode_chunk, False)
                index = faiss.IndexFlatIP(vecs.shape[1])
                index.add(vecs)
                self._ready = (model, index, catalog.item_ids)
            return self._ready


def create_app(cfg: AssayConfig, store: Store, index_id: str | None = None):
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import HTMLResponse
    from pydantic import BaseModel, Field, field_validator

    served = Served(cfg, store, index_id)  # raises on a manifest that does not match its checkpoint
    # hybrid mode's BM25 index is loaded (or built, where mining never ran) and its search compiled before the first
    # request, not by it: measured, the first hybrid request after start-up took 13 s at 20k items
    t0 = time.perf_counter()
    served.bm25_hits("warm up", 1)
    log.info("BM25 for hybrid search ready in %.1f s", time.perf_counter() - t0)
    base = _Base(cfg, store, served)
    max_chars = cfg.serve.max_query_chars
    lock = threading.Lock()  # one forward pass at a time on the shared model

    class SearchRequest(BaseModel):
        query: str = Field(..., max_length=max_chars, description="the search query")
        k: int = Field(10, ge=1, le=1000)
        mode: str = Field("dense", description="dense or hybrid")

        @field_validator("query")
        @classmethod
        def _not_blank(cls, v: str) -> str:
            if not v.strip():
                raise ValueError("the query is empty")
            return v.strip()

        @field_validator("mode")
        @classmethod
        def _mode(cls, v: str) -> str:
            if v not in MODES:
                raise ValueError(f"unknown mode {v!r}; use one of {list(MODES)}")
            return v

    app = FastAPI(title="assay search", version=served.manifest.get("format", ""))
    token = api_token(cfg)
    public_manifest = relative_paths(served.manifest, store.root)

    if token is not None:
        from fastapi.responses import JSONResponse

        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def _require_token(request, call_next):
            if request.url.path not in OPEN_PATHS:
                got = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(got, expected):
                    return JSONResponse({"detail": "missing or wrong bearer token (Authorization: Bearer <token>, "
                                                   f"the value of ${cfg.serve.api_token_env} on the server)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        m = served.manifest
        return {"status": "ok", "index_id": m["index_id"], "n_items": m["n_items"], "checkpoint_sha": m["checkpoint_sha"],
                "modes": {"dense": True, "hybrid": served._bm25 is not None}}

    @app.get("/manifest")
    def manifest() -> dict:
        return public_manifest

    @app.post("/search")
    def search(req: SearchRequest) -> dict:
        t0 = time.perf_counter()
        with lock:
            hits = served.search(req.query, req.k, req.mode)
        return {"query": req.query, "searched": served.correct(req.query), "k": req.k, "mode": req.mode,
                "hits": [h.__dict__ for h in hits],
                "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @app.get("/compare")
    def compare(q: str = Query(..., max_length=max_chars), k: int = Query(10, ge=1, le=100)) -> dict:
        if not q.strip():
            raise HTTPException(status_code=422, detail="the query is empty")
        typed = q.strip()
        grades = _grades(store, typed)
        q = served.correct(typed)  # all three columns search the spelling-corrected text
        with lock:
            bm25 = served.bm25_hits(q, k)
            model, index, ids = base.get()
            import torch

            with torch.inference_mode():
                qv = model.encode_queries([q]).float().cpu().numpy()
            bs, br = search_index(index, qv, k, model.beta)
            trained = served.search(q, k, "dense")
        base_hits = [(str(ids[r]), float(s)) for r, s in zip(br[0], bs[0]) if r >= 0]
        systems = [
            {"name": "BM25", "hits": [_hit(served, i, s, "bm25", grades) for i, s in bm25]},
            {"name": "base encoder", "hits": [_hit(served, i, s, "dense", grades) for i, s in base_hits]},
            {"name": "trained model", "hits": [_hit(served, h.item_id, h.score, h.source, grades) for h in trained]},
        ]
        return {"query": typed, "searched": q, "graded": bool(grades), "systems": systems}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        m = served.manifest
        return (PAGE.replace("__INDEX__", html.escape(m["index_id"])).replace("__SHA__", html.escape(m["checkpoint_sha"]))
                .replace("__N__", f"{m['n_items']:,}"))

    app.state.served = served
    return app


def api_token(cfg: AssayConfig) -> str | None:
    """The bearer token the server requires: the value of ``$serve.api_token_env``, or None when unset/empty."""
    value = os.environ.get(cfg.serve.api_token_env, "").strip() if cfg.serve.api_token_env else ""
    return value or None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: only its owner knows where it resolves
        return False


def exposure_warning(cfg: AssayConfig, host: str) -> str | None:
    """The warning `assay serve` prints for a non-loopback ``host`` (None on loopback)."""
    if is_loopback(host):
        return None
    if api_token(cfg) is None:
        return (f"serving on {host}, reachable from other machines, and without a token: anyone who reaches it can "
                f"search the catalog and read the manifest; set ${cfg.serve.api_token_env} to require "
                "`Authorization: Bearer <token>` on every endpoint but /health")
    return (f"serving on {host}, reachable from other machines; every endpoint but /health requires the bearer "
            f"token in ${cfg.serve.api_token_env}")


def relative_paths(obj, root: Path):
    """A copy of ``obj`` (the manifest) with every absolute path written relative to the workspace ``root``."""
    if isinstance(obj, dict):
        return {k: relative_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_paths(v, root) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        return Path(os.path.relpath(obj, Path(root).resolve())).as_posix()
    return obj


def _hit(served: Served, item_id: str, score: float, source: str, grades: dict) -> dict:
    g = grades.get(item_id)
    return {"item_id": item_id, "title": served.title(item_id), "score": float(np.round(score, 6)), "source": source,
            "grade": None if g is None else int(g)}


def _grades(store: Store, query_text: str) -> dict[str, int]:
    """Grades the workspace holds for a query with this exact text: the human median first, else the newest label."""
    rows = store.exec("""
        WITH q AS (SELECT query_id FROM queries WHERE lower(text) = lower(?)),
        h AS (SELECT item_id, floor(median(grade) + 0.4)::INTEGER AS g FROM human_labels
              WHERE query_id IN (SELECT query_id FROM q) GROUP BY 1),
        l AS (SELECT item_id, grade::INTEGER AS g FROM labels WHERE status = 'ok' AND query_id IN (SELECT query_id FROM q)
              QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY created_at DESC) = 1)
        SELECT coalesce(h.item_id, l.item_id), coalesce(h.g, l.g) FROM h FULL OUTER JOIN l USING (item_id)""",
                      [query_text])
    return {i: g for i, g in rows}


def serve(cfg: AssayConfig, store: Store, *, host: str = "127.0.0.1", port: int = 8080,
          index_id: str | None = None) -> None:
    """Run the app under uvicorn until interrupted (binds to loopback unless told otherwise)."""
    import uvicorn

    warning = exposure_warning(cfg, host)
    if warning:
        log.warning(warning)
    app = create_app(cfg, store, index_id)
    uvicorn.run(app, host=host, port=port, log_level="warning")
