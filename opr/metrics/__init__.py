"""Metrics: per-example text metrics (``text``) and continual-learning summaries."""
