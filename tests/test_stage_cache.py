"""The stage cache: a sweep with it gives the same results as without, shares what is the same, misses on any
change, and survives corrupt entries, killed writers and racing writers."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_cfg

from opr import stage_cache as sc
from opr.config import ConfigError, validate
from opr.run import run_experiment
from opr.stage_cache import StageCache

BASE = TINY + ["budget=0.5"]
# Parts of a stage entry that describe the run that produced it rather than the stage's outcome.
RUN_LOCAL = ("seconds", "stage_cache", "peak_rss_mb")


def outcome(results: dict) -> dict:
    """Everything a stage computes: matrices, metrics, and each stage entry without timings."""
    stages = [{k: v for k, v in e.items() if k not in RUN_LOCAL} for e in results["stages"]]
    for e in stages:
        if "train" in e:
            e["train"] = {k: v for k, v in e["train"].items()
                          if not k.startswith("seconds") and k != "tokens_per_second"}  # timings (seconds_rollout)
    return {"matrix": results["matrix"], "general": results["general"], "metrics": results["metrics"],
            "stages": stages}


def files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob(pattern)) if p.is_file()}


def run(tmp_path: Path, name: str, *overrides: str, cache: Path | None = None) -> dict:
    extra = [f"stage_cache.dir={cache}"] if cache else []
    return run_experiment(compose_cfg(BASE + list(overrides) + extra, tmp_path / name))


def test_cached_sweep_equals_uncached_and_shares_stage_prefixes(tmp_path):
    cache = tmp_path / "cache"
    hits = {}
    for method in ("seq_sft", "vanilla_replay", "opr"):
        plain = run(tmp_path, method, f"method={method}")
        cached = run(tmp_path, method + "_cached", f"method={method}", cache=cache)
        assert outcome(cached) == outcome(plain), method
        assert files(tmp_path / method, "predictions/*/*.jsonl") == files(tmp_path / (method + "_cached"),
                                                                          "predictions/*/*.jsonl")
        hits[method] = cached["stage_cache"]["hit_stages"]
    # seq_sft fills the cache; row 0 and stage 1 (no past task yet: the same data) are shared by the replay
    # methods; vanilla replay's stage 2 (gold replay) is its own. The tiny model's rollouts all score 0, so
    # OPR keeps none and its stage 2 *is* seq_sft's: a content key finds that too.
    assert hits == {"seq_sft": [], "vanilla_replay": [0, 1], "opr": [0, 1, 2]}

    # seq_sft at another budget: every stage is a hit, and the saved checkpoint holds the same weights.
    again = run(tmp_path, "seq_sft_b02", "method=seq_sft", "budget=0.2", cache=cache)
    assert again["stage_cache"]["hit_stages"] == [0, 1, 2] and again["stage_cache"]["seconds_saved"] > 0
    assert outcome(again) == outcome(run(tmp_path, "seq_sft_b02_plain", "method=seq_sft", "budget=0.2"))
    assert all(e["stage_cache"]["hit"] and len(e["stage_cache"]["key"]) == 40 for e in again["stages"])
    assert files(tmp_path / "seq_sft", "checkpoints/stage2/*.safetensors") == \
        files(tmp_path / "seq_sft_b02", "checkpoints/stage2/*.safetensors")


@pytest.mark.parametrize("change", ["engine.lr=2e-4", "seed=1", "eval.max_examples=3", "analysis.k=8",
                                    "benchmark.train_size=10", "engine.max_length=128", "code"])
def test_any_change_that_affects_a_stage_misses(tmp_path, monkeypatch, change):
    cache = tmp_path / "cache"
    run(tmp_path, "first", "method=seq_sft", cache=cache)
    if change == "code":  # an edited source file changes code_version
        monkeypatch.setattr(sc, "code_version", lambda root=sc.ROOT: "an-edited-loss")
        second = run(tmp_path, "second", "method=seq_sft", cache=cache)
    else:
        second = run(tmp_path, "second", "method=seq_sft", change, cache=cache)
    assert second["stage_cache"]["hits"] == 0


def test_where_results_go_does_not_change_the_key(tmp_path):
    cache = tmp_path / "cache"
    run(tmp_path, "first", "method=seq_sft", cache=cache)
    second = run(tmp_path, "second", "method=seq_sft", "experiment_name=other", "checkpoint.save=false",
                 cache=cache)
    assert second["stage_cache"]["hit_stages"] == [0, 1, 2]


def test_corrupt_entries_are_misses_and_get_replaced(tmp_path, caplog):
    cache = tmp_path / "cache"
    first = run(tmp_path, "first", "method=seq_sft", cache=cache)
    keys = [e["stage_cache"]["key"] for e in first["stages"]]
    model = cache / keys[1] / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    model.write_bytes(bytes(data))
    (cache / keys[2] / "entry.json").write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="opr"):
        second = run(tmp_path, "second", "method=seq_sft", cache=cache)
    assert "checksum mismatch in model.pt" in caplog.text and "JSONDecodeError" in caplog.text
    # row 0 is a hit; stage 1's entry is corrupt (recomputed); stage 2's start then differs from nothing:
    # its key is the same, its entry corrupt, so it is recomputed too
    assert second["stage_cache"]["hit_stages"] == [0]
    assert outcome(second) == outcome(first)
    third = run(tmp_path, "third", "method=seq_sft", cache=cache)  # the entries were replaced by good ones
    assert third["stage_cache"]["hit_stages"] == [0, 1, 2]


def _store_then_die(directory: str, key: str) -> None:
    """A writer killed after writing every file but before the rename (os._exit skips all cleanup)."""
    cache = StageCache(directory)
    sc.os.rename = lambda *a: os._exit(9)
    cache.store(key, {"stage": 1}, {"w": torch.ones(3)}, {"x": 1}, None)


def _store(directory: str, key: str, barrier, results) -> None:
    cache = StageCache(directory)
    barrier.wait()  # all writers start together
    results.put(cache.store(key, {"stage": 1}, {"w": torch.arange(100_000, dtype=torch.float32)}, {"x": 1}, None))


def test_a_killed_writer_leaves_no_usable_entry(tmp_path):
    key = "a" * 40
    proc = mp.get_context("spawn").Process(target=_store_then_die, args=(str(tmp_path), key))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(sc.TMP_PREFIX)  # all files written, never renamed
    cache = StageCache(tmp_path)
    assert cache.load(key) is None and cache.entries() == []
    assert cache.store(key, {"stage": 1}, {"w": torch.ones(3)}, {"x": 1}, None)
    assert torch.equal(cache.load(key).model["w"], torch.ones(3))
    old = tmp_path / leftovers[0]
    os.utime(old, (0, 0))  # a day-old temp folder is cleaned up at the next trim
    cache.trim()
    assert not old.exists()


def test_racing_writers_all_finish_and_one_entry_wins(tmp_path):
    ctx = mp.get_context("spawn")
    key = "b" * 40
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_store, args=(str(tmp_path), key, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    stored = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sorted(stored) == [False, False, False, True]
    hit = StageCache(tmp_path).load(key)
    assert torch.equal(hit.model["w"], torch.arange(100_000, dtype=torch.float32))
    assert [p.name for p in tmp_path.iterdir()] == [key]  # no temp folders left behind


def test_size_bound_removes_least_recently_used(tmp_path):
    one = {"w": torch.zeros(250_000)}  # ~1 MB per entry
    cache = StageCache(tmp_path, max_gb=2.5 / 1024)  # room for two entries
    for i, key in enumerate(("1" * 40, "2" * 40)):
        cache.store(key, {"stage": i}, one, {}, None)
        os.utime(tmp_path / key / sc.ENTRY, (1000 + i, 1000 + i))
    assert cache.load("1" * 40) is not None  # now the most recently used
    cache.store("3" * 40, {"stage": 3}, one, {}, None)
    assert sorted(p.name[0] for p in tmp_path.iterdir()) == ["1", "3"]


def test_entry_records_its_key_and_source(tmp_path):
    cache = tmp_path / "cache"
    first = run(tmp_path, "first", "method=seq_sft", cache=cache)
    key = first["stages"][1]["stage_cache"]["key"]
    record = json.loads((cache / key / sc.ENTRY).read_text())
    assert record["key"] == key and record["source"] == str(tmp_path / "first") and record["task"] == "emotion"
    assert set(record["files"]) >= {"model.pt", "state.pt", "predictions/emotion.jsonl"}


def test_config_errors_name_the_value(tmp_path):
    with pytest.raises(ConfigError, match="stage_cache.max_gb must be > 0, got 0"):
        validate(compose_cfg(BASE + [f"stage_cache.dir={tmp_path}", "stage_cache.max_gb=0"], tmp_path / "r"))
    with pytest.raises(ConfigError, match="engine=torch"):
        validate(compose_cfg(BASE + [f"stage_cache.dir={tmp_path}", "engine=deepspeed"], tmp_path / "r"))


def test_sweep_cost_counts_hits_and_savings(tmp_path, capsys):
    from opr.tools.bench.sweep_cost import main

    cache = tmp_path / "cache"
    run(tmp_path / "sweep", "seq_sft", "method=seq_sft", cache=cache)
    second = run(tmp_path / "sweep", "vanilla", "method=vanilla_replay", cache=cache)
    out = main([str(tmp_path / "sweep"), "--out", str(tmp_path / "cost.json")])
    by_run = {r["run"]: r for r in out["runs"]}
    assert by_run["seq_sft"]["cache_hits"] == "-" and by_run["seq_sft"]["saved_s"] == 0
    assert by_run["vanilla"]["cache_hits"] == "0,1"
    assert by_run["vanilla"]["saved_s"] == pytest.approx(second["stage_cache"]["seconds_saved"])
    total = out["totals"]
    assert total["spent_s"] == pytest.approx(sum(r["spent_s"] for r in out["runs"]))
    assert total["ratio_to_uncached"] == pytest.approx(total["spent_s"] / (total["spent_s"] + total["saved_s"]))
    assert total["cost_in_runs"] == pytest.approx(total["spent_s"] / by_run["seq_sft"]["spent_s"])
    assert "cache_hits" in capsys.readouterr().out


def test_greedy_row0_key_leaves_out_seed_and_rng_sampled_keeps_them():
    parts = dict(code="c", env={}, weights="w", tokenizer="t", benchmark="b")
    cfg0, cfg1 = {"seed": 0, "eval": {"temperature": 0.0}}, {"seed": 1, "eval": {"temperature": 0.0}}
    assert sc.row0_key(**parts, config=cfg0, rng=None) == sc.row0_key(**parts, config=cfg1, rng=None)
    assert sc.row0_key(**parts, config=cfg0, rng="r0") != sc.row0_key(**parts, config=cfg1, rng="r0")
    assert sc.row0_key(**parts, config=cfg0, rng="r0") != sc.row0_key(**parts, config=cfg0, rng="r1")
    stage = dict(prev="p", stage=1, task="a", data="d", train_identity={}, rng="r", global_step=0)
    assert sc.stage_key(**stage, seed=0) != sc.stage_key(**stage, seed=1)


def test_sampled_evaluation_caches_row0_per_seed(tmp_path):
    cache = tmp_path / "cache"
    first = run(tmp_path, "first", "method=seq_sft", "eval.temperature=0.7", cache=cache)
    second = run(tmp_path, "second", "method=seq_sft", "eval.temperature=0.7", cache=cache)
    assert second["stage_cache"]["hit_stages"] == [0, 1, 2] and outcome(second) == outcome(first)


def test_a_failed_cache_write_warns_once_and_loses_no_stage(tmp_path, monkeypatch, caplog):
    """A read-only / full / unwritable cache: the first failed store warns, storing is off for the rest of
    the run, and every stage is still trained, evaluated and recorded (the run completes)."""
    import errno

    calls = []

    def read_only(self, key, *args, **kwargs):
        calls.append(key)
        raise OSError(errno.EROFS, "Read-only file system", str(self.dir / key))

    monkeypatch.setattr(StageCache, "store", read_only)
    with caplog.at_level(logging.WARNING, logger="opr"):
        results = run(tmp_path, "ro", "method=seq_sft", cache=tmp_path / "cache")
    assert results["status"] == "complete"
    assert len(results["matrix"]) == 3 and [e["stage"] for e in results["stages"]] == [0, 1, 2]
    assert len(calls) == 1  # storing turned off after the first failure
    assert caplog.text.count("could not store") == 1 and "Read-only file system" in caplog.text
    assert results["stage_cache"]["store_error"].startswith("OSError: [Errno 30]")
    assert [e["stage_cache"]["stored"] for e in results["stages"]] == [False, False, False]
    saved = json.loads((tmp_path / "ro" / "results.json").read_text())
    assert saved["status"] == "complete" and len(saved["matrix"]) == 3


def test_an_empty_a_file_or_an_uncreatable_cache_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import opr.run

    loaded = []
    monkeypatch.setattr(opr.run, "build", lambda *a, **k: loaded.append(a) or pytest.fail("built a component"))
    monkeypatch.chdir(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {"''": r"stage_cache.dir='' is empty: it would put the cache's entries into the current directory",
             str(afile): rf"stage_cache.dir='{afile}' is an existing file, not a folder",
             str(afile / "sub"): rf"stage_cache.dir='{afile / 'sub'}' cannot be created \(Not a directory\)"}
    for value, message in cases.items():
        cfg = compose_cfg(BASE + [f"stage_cache.dir={value}"], tmp_path / "run")
        with pytest.raises(ConfigError, match=message):
            run_experiment(cfg)
    assert loaded == [] and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_leading_tilde_in_a_path_option_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = validate(compose_cfg(BASE + ["stage_cache.dir='~/opr/stages'", "run_dir='~/runs/a'"]))
    assert cfg.stage_cache.dir == str(tmp_path / "home" / "opr" / "stages") and Path(cfg.stage_cache.dir).is_dir()
    assert cfg.run_dir == str(tmp_path / "home" / "runs" / "a")


def test_sweep_cost_of_nothing_is_one_line_and_a_bad_record_is_skipped(tmp_path, capsys):
    from opr.tools.bench.sweep_cost import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "empty")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: no results.json under {tmp_path / 'empty'}\n"
    (tmp_path / "sweep" / "bad").mkdir(parents=True)
    (tmp_path / "sweep" / "bad" / "results.json").write_text('{"status": "comp')  # truncated
    out = main([str(tmp_path / "sweep")])
    assert out["runs"] == [] and out["totals"]["runs"] == 0
    assert f"skipped {tmp_path / 'sweep' / 'bad' / 'results.json'}: unreadable (JSONDecodeError" in capsys.readouterr().err


GRPO = ["method=grpo", "method.steps=2", "method.prompts_per_step=4", "method.group_size=4", "method.kl_coef=0.05",
        "analysis.drift=false", "analysis.diagnostics=false"]


def test_grpo_without_replay_budget_shares_its_stages_across_budgets(tmp_path):
    cache = tmp_path / "cache"
    run(tmp_path, "b05", *GRPO, cache=cache)
    other = run(tmp_path, "b02", *GRPO, "budget=0.2", cache=cache)  # grpo ignores the budget: every stage hits
    assert other["stage_cache"]["hit_stages"] == [0, 1, 2]
    assert outcome(other) == outcome(run(tmp_path, "b02_plain", *GRPO, "budget=0.2"))
    # with replay_budget the budget picks its replay prompts: the budget is part of the key
    run(tmp_path, "rb05", *GRPO, "method.replay_budget=true", cache=cache)
    replay = run(tmp_path, "rb02", *GRPO, "method.replay_budget=true", "budget=0.2", cache=cache)
    assert replay["stage_cache"]["hit_stages"] == [0]


def test_a_read_only_cache_serves_its_hits_and_the_missed_stage_is_kept(tmp_path, monkeypatch, caplog):
    """The reported case: the cache holds row 0 and stage 1 (shared with seq_sft), stage 2 misses, and storing
    it fails: the run completes with stage 2 trained, evaluated and in results.json and the training state."""
    import errno

    from opr import checkpoint as ckpt

    cache = tmp_path / "cache"
    run(tmp_path, "fill", "method=seq_sft", cache=cache)

    def read_only(self, key, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self.dir / key))

    monkeypatch.setattr(StageCache, "store", read_only)
    with caplog.at_level(logging.WARNING, logger="opr"):
        results = run(tmp_path, "vanilla", "method=vanilla_replay", cache=cache)
    assert results["status"] == "complete" and results["stage_cache"]["hit_stages"] == [0, 1]
    assert results["stages"][2]["stage_cache"] == {"key": results["stages"][2]["stage_cache"]["key"], "hit": False,
                                                   "stored": False}
    assert outcome(results) == outcome(run(tmp_path, "vanilla_plain", "method=vanilla_replay"))
    state = ckpt.load_train_state(ckpt.latest_train_state(tmp_path / "vanilla"))
    assert len(state["results"]["matrix"]) == 3  # the training state reaches stage 2
    assert caplog.text.count("could not store stage 2") == 1
