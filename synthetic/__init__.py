"""Synthetic demo data: realistic, seeded service-use records for demos, tests and benchmarks.

Not part of the privacy path: its randomness is numpy's (for realism), never privacy noise.
It imports nothing of civicdp; it writes the metadata.json format that queries/metadata.py reads.
"""
