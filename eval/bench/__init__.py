"""Benchmarks (scripts that print tables for BENCHMARKS.md); not part of the default test suite."""
