"""Conformance suite: proves, with evidence, what a worker's isolation actually does."""
