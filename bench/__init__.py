"""Benchmark scripts: each prints figures and never passes or fails on time (see README.md)."""
