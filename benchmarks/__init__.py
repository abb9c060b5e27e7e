"""Benchmarks behind `streamrec bench ...`: JSON out, floors measured beside the system."""
