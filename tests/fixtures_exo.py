"""Fixtures serving the exo HTTP contract with a simulator (see tests/exo_simulator.py)."""
