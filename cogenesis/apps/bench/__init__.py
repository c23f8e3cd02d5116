"""Benchmarks: measured side by side in one run, written to JSON, a markdown table and a PNG plot."""
