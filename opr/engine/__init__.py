"""Training engines: ``torch`` (single process) and ``deepspeed`` (ZeRO, many processes)."""
