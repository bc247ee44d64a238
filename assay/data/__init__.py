"""Data in: ingest (WANDS, ESCI, generic files) and the simulated e-commerce world."""
