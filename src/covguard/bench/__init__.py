"""Benchmarks: each entry point runs one experiment end to end and writes a report folder."""
