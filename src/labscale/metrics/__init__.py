"""Metrics: per-example statistics plus an aggregate, so every score can be bootstrapped (see `stats`)."""
