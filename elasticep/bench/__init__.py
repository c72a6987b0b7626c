"""Benchmarks behind ``elasticep bench <name>``; each prints figures and can write JSON."""
