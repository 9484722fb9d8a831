"""Synthetic demo data: realistic, seeded service-use records for demos, tests and benchmarks.

Not part of the privacy path: its randomness is numpy's (for realism), never privacy noise.
It imports nothing else of civicdp; it writes the metadata.json format that queries/metadata.py reads.
``demo_data.generate`` is the entry point; ``catalogue``, ``profiles``, ``timing``, ``demand``,
``handling`` and ``declaration`` are its parts (see :mod:`civicdp.synthetic.demo_data`).
"""
