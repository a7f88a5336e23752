"""Efficiency measurement: latency, throughput, peak memory."""
