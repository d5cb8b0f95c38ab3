"""JSON-lines files as the tools read them: ``x.jsonl`` or, where only that exists, ``x.jsonl.gz``.

A run writes its predictions and replay dumps as plain ``.jsonl``; copies kept in git (``docs/results/``) are
gzip-compressed. Every tool that reads them (the report, ``rescore``, ``ngrams``, ``score``) goes through
:func:`resolve` and :func:`read_text`, so either form reads the same.
"""

from __future__ import annotations

import gzip
from pathlib import Path

GZ = ".gz"


def resolve(path: Path) -> Path:
    """``path`` when it exists, else ``path.gz`` when that exists, else ``path`` (missing: the caller says so)."""
    path = Path(path)
    if path.exists() or path.suffix == GZ:
        return path
    packed = path.with_name(path.name + GZ)
    return packed if packed.exists() else path


def exists(path: Path) -> bool:
    """Whether ``path`` or its ``.gz`` form exists."""
    return resolve(path).is_file()


def read_text(path: Path) -> str:
    """The text of ``path`` or of its ``.gz`` form (UTF-8); raises ``OSError`` where neither exists."""
    path = resolve(path)
    if path.suffix == GZ:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def files(folder: Path, pattern: str = "*.jsonl") -> list[Path]:
    """The files matching ``pattern`` in ``folder``, each named by its plain form (``x.jsonl`` also for a
    ``x.jsonl.gz``), sorted; read them with :func:`read_text`."""
    folder = Path(folder)
    found = {p for p in folder.glob(pattern)}
    found |= {p.with_name(p.name[: -len(GZ)]) for p in folder.glob(pattern + GZ)}
    return sorted(found)
