"""Benchmarking: `purifier bench` (speed sweeps and paired quality, `bench`)."""
