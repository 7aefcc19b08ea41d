"""Orchestration: config expansion, one run end to end, records, provenance."""
