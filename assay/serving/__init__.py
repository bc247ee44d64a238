"""Serving (planned; ARCHITECTURE.md "Serving"): builds FAISS indexes bound to a checkpoint by a
manifest (`indexes` table, artifacts/index/) and answers dense or hybrid search."""
