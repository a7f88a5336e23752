"""Evaluation engine: plan the grid, run it through the generation cache, store results."""
