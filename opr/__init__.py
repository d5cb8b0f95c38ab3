"""opr: continual post-training of LLMs with On-Policy Replay and its baselines."""

__version__ = "0.1.0"
