"""A content-addressed cache of finished stages, so that a sweep computes each distinct stage once.

A stage's outcome (its end weights, RNG state, evaluation rows, predictions and its ``results.json`` entry) is
a deterministic function of what goes into it. The key hashes exactly that, as a chain::

    key_0 = H(code, environment, run config without its non-experiment keys and without method/budget,
              initial weights, tokenizer, every task's data, RNG state at the start)          # row 0
            (greedy evaluation draws no random number: then without the RNG state and the seed,
             so all seeds of a pretrained backbone share row 0)
    key_t = H(key_{t-1},                     # the weights, RNG and step counter the stage starts from
              stage t, the stage's training data (content, not names),
              what else the method's training reads (``Method.train_identity``),
              the RNG state after the data was built, the seed)

so stage 1 of ``vanilla_replay``, ``opr`` and ``lowscore_replay`` at one seed (no past tasks yet, the same
current-task examples and order) share an entry, and every stage of ``seq_sft`` (and of ``grpo`` / ``self_distill``
without ``replay_budget``, which ignore the budget) is shared across budgets.
The stage's data is always built in the running run (it may depend on the method and budget); only the
training, evaluation and analysis that follow are looked up.

Safety: the code is part of the key (a hash of every ``opr/`` source file and ``train.py``; package versions,
torch thread count, device), so an edited loss never hits a stale entry. An entry is written into a
temporary folder and renamed into place, so a reader never sees half of one (a killed writer leaves only a
``.tmp-`` folder, which is never read and is removed after a day); two writers racing on one key both
finish, the second's copy is dropped. Every file of an entry is checksummed; a corrupt or unreadable entry
is a miss with a warning, never a crash; a write that fails (read-only file system, full disk, permissions)
warns once and turns storing off for the rest of the run, which goes on (lookups too). The directory is
kept under ``max_gb`` (least recently used first).

Layout: ``<dir>/<key>/`` with ``entry.json`` (the record, checksums), ``model.pt`` (stage-end weights; row 0
has none), ``state.pt`` (RNG states) and ``predictions/*.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("opr")

# Top-level config keys that do not change what a stage computes (where results go, how they are kept and
# logged). ``method`` and ``budget`` are left out too: their effect enters the key through the stage's data
# and ``Method.train_identity``. Every other key (present or added later) is part of the key.
KEY_FREE_CONFIG = ("run_dir", "experiment_name", "resume", "checkpoint", "logger", "stage_cache", "method", "budget")
# Where inputs lie on disk: their content is hashed instead (weights, tokenizer, every task's examples).
LOCATION_KEYS = (("benchmark", "root"), ("backbone", "cache_dir"))
# Packages whose versions can change a number: the model and metric code outside ``opr/``.
VERSIONED_PACKAGES = ("torch", "transformers", "numpy", "tokenizers", "rouge", "fuzzywuzzy", "rapidfuzz",
                      "sacrebleu", "safetensors", "vllm")
ENTRY = "entry.json"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 24 * 3600
ROOT = Path(__file__).resolve().parents[1]


def _hasher():
    return hashlib.blake2b(digest_size=20)


def hash_json(obj: Any) -> str:
    """A stable hash of a JSON-able value (dict keys sorted; dataclasses, tuples and paths as plain values)."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=_plain, ensure_ascii=False).encode(),
                           digest_size=20).hexdigest()


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def code_version(root: Path = ROOT) -> str:
    """A hash of the library's sources (every ``opr/**/*.py`` and ``train.py``): any edit changes it."""
    h = _hasher()
    files = sorted((root / "opr").rglob("*.py")) + [root / "train.py"]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def environment_identity() -> dict:
    """What outside ``opr/`` can change a floating-point result: package versions, threads, the device."""
    versions = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    from opr.provenance import cpu_model

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_model()
    return {"versions": versions, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "device": device}


def hash_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of tensor names, dtypes, shapes and bytes (≈0.5 s for SmolLM2-135M's 540 MB)."""
    h = _hasher()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_tokenizer(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hash_json({"vocab": vocab, "chat_template": getattr(tokenizer, "chat_template", None),
                      "special": tokenizer.all_special_tokens, "eos": tokenizer.eos_token_id,
                      "pad": tokenizer.pad_token_id, "padding_side": tokenizer.padding_side})


def hash_benchmark(benchmark) -> str:
    """Every task's name, prompting options and examples (train, eval, test) and the general sets; the reward
    functions are code (``code_version``)."""

    def task(t) -> dict:
        return {"name": t.name, "chat": t.chat, "max_new_tokens": t.max_new_tokens,
                "train": t.train, "eval": t.eval, "test": t.test}

    return hash_json({"name": benchmark.name, "tasks": [task(t) for t in benchmark.tasks],
                      "general": [task(g) for g in benchmark.general]})


def hash_rng(state: dict) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    return hashlib.blake2b(buf.getvalue(), digest_size=20).hexdigest()


def hash_stage_data(data) -> str:
    """The stage's training inputs: every field of the StageData except ``stats`` (what building it
    measured, not what training reads)."""
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name != "stats"}
    return hash_json(fields)


def row0_key(*, code: str, env: dict, config: Mapping, weights: str, tokenizer: str, benchmark: str,
             rng: Optional[str]) -> str:
    """Row 0's key. ``rng=None`` for greedy evaluation, which draws no random number: then the seed is left
    out too, and every seed of a backbone shares row 0 (the weights hash still tells seeds of a randomly
    initialised backbone apart)."""
    experiment = {k: v for k, v in config.items() if k not in KEY_FREE_CONFIG}
    if rng is None:
        experiment.pop("seed", None)
    for group, name in LOCATION_KEYS:
        if isinstance(experiment.get(group), Mapping):
            experiment[group] = {k: v for k, v in experiment[group].items() if k != name}
    return hash_json({"kind": "row0", "code": code, "env": env, "config": experiment, "weights": weights,
                      "tokenizer": tokenizer, "benchmark": benchmark, "rng": rng})


def stage_key(*, prev: str, stage: int, task: str, data: str, train_identity: dict, rng: str,
              global_step: int, seed: int) -> str:
    """Stage ``stage``'s key (the seed is named: the trainer's batch order reads it, and row 0's key may not
    hold it)."""
    return hash_json({"kind": "stage", "prev": prev, "stage": stage, "task": task, "data": data,
                      "train": train_identity, "rng": rng, "global_step": global_step, "seed": seed})


@dataclasses.dataclass
class CachedStage:
    """One loaded entry: ``record`` is what ``entry.json`` holds (``entry``: the stage's results.json entry
    as the computing run wrote it, ``row``/``general_row``: its evaluation rows, ``global_step``,
    ``source``: the run that computed it); ``model`` the stage-end weights (None for row 0); ``rng`` the RNG
    states at the stage end; ``predictions`` file name -> bytes."""

    key: str
    record: dict
    model: Optional[dict]
    rng: dict
    predictions: dict[str, bytes]


class StageCache:
    """``stage_cache.dir`` as an object: :meth:`load` (a hit or None) and :meth:`store`."""

    def __init__(self, directory: str | os.PathLike, max_gb: float = 20.0) -> None:
        if max_gb <= 0:
            raise ValueError(f"stage_cache.max_gb must be > 0, got {max_gb}")
        self.dir = Path(directory)
        self.max_bytes = int(max_gb * 1024**3)
        self.dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ read
    def load(self, key: str) -> Optional[CachedStage]:
        """The entry under ``key``, verified against its checksums, or None (absent, or corrupt: warned)."""
        folder = self.dir / key
        if not (folder / ENTRY).is_file():
            return None
        try:
            record = json.loads((folder / ENTRY).read_text())
            if record.get("key") != key:
                raise ValueError(f"entry.json names key {record.get('key')!r}")
            blobs = {}
            for rel, digest in record["files"].items():
                data = (folder / rel).read_bytes()
                if hashlib.blake2b(data, digest_size=20).hexdigest() != digest:
                    raise ValueError(f"checksum mismatch in {rel}")
                blobs[rel] = data
            model = torch.load(io.BytesIO(blobs["model.pt"]), weights_only=True) if "model.pt" in blobs else None
            rng = torch.load(io.BytesIO(blobs["state.pt"]), weights_only=False)
        except Exception as err:  # noqa: BLE001 - any defect of an entry is a miss, never a crash
            log.warning("stage cache: corrupt entry %s (%s: %s): a miss; removing it so that this run's result "
                        "replaces it", folder, type(err).__name__, err)
            self._discard(folder)
            return None
        try:
            os.utime(folder / ENTRY)  # least recently *used* goes first when the cache is trimmed
        except OSError:
            pass
        preds = {rel.split("/", 1)[1]: b for rel, b in blobs.items() if rel.startswith("predictions/")}
        return CachedStage(key, record, model, rng, preds)

    def _discard(self, folder: Path) -> None:
        """Move an entry out of the way atomically (readers see it gone at once), then delete it."""
        aside = self.dir / f"{TMP_PREFIX}discarded-{folder.name}-{os.getpid()}-{time.time_ns()}"
        try:
            os.rename(folder, aside)
        except OSError:  # another process removed or replaced it first
            return
        shutil.rmtree(aside, ignore_errors=True)

    # ------------------------------------------------------------------ write
    def store(self, key: str, record: dict, model: Optional[dict], rng: dict,
              predictions_dir: Optional[Path]) -> bool:
        """Write an entry atomically; False when another process wrote the same key first (ours is dropped)."""
        final = self.dir / key
        if (final / ENTRY).is_file():
            return False
        tmp = self.dir / f"{TMP_PREFIX}{key}-{os.getpid()}-{time.time_ns()}"
        try:
            tmp.mkdir(parents=True)
            files: dict[str, str] = {}

            def put(rel: str, data: bytes) -> None:
                path = tmp / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                files[rel] = hashlib.blake2b(data, digest_size=20).hexdigest()

            if model is not None:
                buf = io.BytesIO()
                torch.save({k: v.detach().to("cpu") for k, v in model.items()}, buf)
                put("model.pt", buf.getvalue())
            buf = io.BytesIO()
            torch.save(rng, buf)
            put("state.pt", buf.getvalue())
            if predictions_dir is not None and predictions_dir.is_dir():
                for f in sorted(predictions_dir.glob("*.jsonl")):
                    put(f"predictions/{f.name}", f.read_bytes())
            full = {**record, "key": key, "files": files, "created": time.time()}
            (tmp / ENTRY).write_text(json.dumps(full, indent=1, ensure_ascii=False))
            try:
                os.rename(tmp, final)  # atomic; fails when the key exists (a racing writer was first)
            except OSError:
                if (final / ENTRY).is_file():
                    return False
                shutil.rmtree(final, ignore_errors=True)  # an unusable leftover without entry.json
                os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.trim(keep=key)
        return True

    # ------------------------------------------------------------------ size
    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every complete entry."""
        out = []
        for p in self.dir.iterdir():
            marker = p / ENTRY
            if p.is_dir() and not p.name.startswith(TMP_PREFIX) and marker.is_file():
                try:
                    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                    out.append((marker.stat().st_mtime, size, p))
                except OSError:  # removed by another process meanwhile
                    continue
        return out

    def trim(self, keep: Optional[str] = None) -> None:
        """Delete least recently used entries until the cache is under ``max_gb``, and stale temp folders."""
        now = time.time()
        for p in self.dir.glob(f"{TMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                continue
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        for _, size, folder in entries:
            if total <= self.max_bytes:
                break
            if folder.name == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            log.info("stage cache: removed %s (least recently used) to stay under %.1f GB", folder.name,
                     self.max_bytes / 1024**3)
