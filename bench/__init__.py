"""Benchmarks (``make bench``): each measures a path beside its raw baseline, in one run."""
