"""Tiny runs whose results.json files cover every part of the run record (tests/test_results_record.py).

``run_scenarios(folder)`` runs them and returns ``{scenario: results.json as parsed}``; run as a script, it
writes them as the golden file the test compares against::

    OMP_NUM_THREADS=1 .venv/bin/python tests/results_scenarios.py   # -> tests/data/results_record_golden.json

The golden was produced by the loop that built results.json as a dict literal (the commit before
``opr.results``); regenerate it only when a change of results.json is intended.

Scenarios: a stage-cached run (misses: every stage stored; row 0 and per-stage ``stage_cache`` marks, the
top-level cache summary) and the same run again (hits: ``cached_*`` seconds, ``source``); a run that fails
(``failed`` with the error), one interrupted after a stage's training (``interrupted``) and its resumption
from the stage end (``resumed``), one stopped by SIGINT inside a stage (a mid-stage training state) and its
resumption, and one whose loss turns NaN (``diverged``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY, compose_cfg  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "results_record_golden.json"


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def run_scenarios(folder: Path) -> dict[str, dict]:
    from opr.engine.torch_engine import TorchTrainer
    from opr.loop import ContinualLoop
    from opr.run import run_experiment

    out: dict[str, dict] = {}
    cached = TINY + ["method=vanilla_replay", "budget=0.5", f"stage_cache.dir={folder / 'cache'}"]
    run_experiment(compose_cfg(cached, folder / "cache_miss"))
    out["cache_miss"] = _results(folder / "cache_miss")
    run_experiment(compose_cfg(cached, folder / "cache_hit"))
    out["cache_hit"] = _results(folder / "cache_hit")

    real_eval = ContinualLoop._evaluate
    with pytest.MonkeyPatch.context() as mp:
        def disk_full(self, stage, entry):
            if stage == 1:
                raise OSError(28, "No space left on device")
            return real_eval(self, stage, entry)

        mp.setattr(ContinualLoop, "_evaluate", disk_full)
        with pytest.raises(OSError):
            run_experiment(compose_cfg(TINY + ["method=seq_sft"], folder / "failed"))
    out["failed"] = _results(folder / "failed")

    replay = TINY + ["method=vanilla_replay", "budget=0.2"]
    with pytest.MonkeyPatch.context() as mp:
        def crash_in_stage2_eval(self, stage, entry):
            if stage == 2:
                raise KeyboardInterrupt("simulated crash after stage 2's training")
            return real_eval(self, stage, entry)

        mp.setattr(ContinualLoop, "_evaluate", crash_in_stage2_eval)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(compose_cfg(replay, folder / "stage_end"))
    out["interrupted_stage_end"] = _results(folder / "stage_end")
    run_experiment(compose_cfg(replay, folder / "stage_end"))
    out["resumed_stage_end"] = _results(folder / "stage_end")

    sigint = TINY + ["method=seq_sft", "engine.epochs=2"]
    real_step = TorchTrainer.optimizer_step
    with pytest.MonkeyPatch.context() as mp:
        def interrupted_step(self, *args, **kwargs):
            result = real_step(self, *args, **kwargs)
            if self.stage == 2 and self.stage_step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of stage 2
            return result

        mp.setattr(TorchTrainer, "optimizer_step", interrupted_step)
        with pytest.raises(SystemExit):
            run_experiment(compose_cfg(sigint, folder / "mid_stage"))
    out["interrupted_mid_stage"] = _results(folder / "mid_stage")
    run_experiment(compose_cfg(sigint, folder / "mid_stage"))
    out["resumed_mid_stage"] = _results(folder / "mid_stage")

    real_loss, real_fit = TorchTrainer.sft_loss, TorchTrainer.fit_sft
    with pytest.MonkeyPatch.context() as mp:
        def poisoned(model, batch):
            loss, m = real_loss(model, batch)
            return (loss * float("nan") if poisoned.stage2 else loss), m

        poisoned.stage2 = False

        def fit(self, examples, desc="train", task=None):
            poisoned.stage2 = "stage 2" in desc
            return real_fit(self, examples, desc, task)

        mp.setattr(TorchTrainer, "sft_loss", staticmethod(poisoned))
        mp.setattr(TorchTrainer, "fit_sft", fit)
        from opr.loop import StageDiverged

        with pytest.raises(StageDiverged):
            run_experiment(compose_cfg(TINY + ["method=seq_sft"], folder / "diverged"))
    out["diverged"] = _results(folder / "diverged")
    return out


def normalise(value, folder: str):
    """``value`` with the scenario folder's path replaced by ``<tmp>`` in every string."""
    if isinstance(value, dict):
        return {k: normalise(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, folder) for v in value]
    if isinstance(value, str):
        return value.replace(folder, "<tmp>")
    return value


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = normalise(run_scenarios(Path(tmp)), tmp)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDEN}")
