"""Benchmarks: each prints JSON plus a markdown table and writes bench/results/<name>.json."""
