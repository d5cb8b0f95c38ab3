"""Benchmarks of the project's hot paths (generation, SFT) against reference implementations, and of a
run's wall time per stage. Each module is a script: ``python -m opr.tools.bench.<name> --help``."""
