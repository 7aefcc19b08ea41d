"""Measurement: latency, throughput, peak memory, Tables 9 / 10 overheads."""
