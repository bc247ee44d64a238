"""Scale-out on Ray (docs/scale.md): `assay annotate --engine ray` in three steps, so the DuckDB workspace keeps its
single writer.

- :mod:`assay.scale.plan` (the writer): pending pairs -> Parquet shards sorted by query, a plan manifest and
  ``work_shards`` rows;
- :mod:`assay.scale.execute` (Ray Data; never opens ``assay.duckdb``): one ``map_batches`` actor-pool stage per
  judge, each shard's output written once as ``out/<shard>/<attempt>.parquet`` and then ``_SUCCESS.json``;
- :mod:`assay.scale.commit` (the writer): finished shards checked against the plan and upserted into ``labels``
  and ``label_votes``, one transaction per shard.

:mod:`assay.scale.run` chains the three (`annotate.engine: ray`); :mod:`assay.scale.cluster` starts or joins Ray.
"""

from assay.scale.cluster import RayUnavailable, connect, require_ray

__all__ = ["RayUnavailable", "connect", "require_ray"]
