"""Monitors: questions answered batch by batch over a fixed horizon, with alerts, and the
per-person working files of each batch.
"""
