"""Curriculum (planned; ARCHITECTURE.md "Five tiers, three stages"): reads labels, candidates and
negatives, writes `examples(query_id, item_id, tier, stage, target, weight)`."""
