"""Tests of the drift analysis (``opr.analysis.drift``) and its CLI (``python -m opr.tools.analyze``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opr.analysis import drift as D
from opr.tools import analyze


def _orthonormal(m: int, n: int, seed: int) -> torch.Tensor:
    """(m, n) with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    return q


def _known_svd(m: int = 40, n: int = 24, rank: int | None = None, seed: int = 0, decay: float | None = None):
    """W = U diag(s) V^T with distinct singular values (linear from 10 to 1, or geometric 10 * decay^i); U is
    (m, m) so that U[:, n:] is orthogonal to W's column space. ``rank`` zeroes the singular values after the
    first ``rank``."""
    U = _orthonormal(m, m, seed)
    V = _orthonormal(n, n, seed + 1)
    if decay is None:
        s = torch.linspace(10.0, 1.0, n, dtype=torch.float64)
    else:
        s = 10.0 * decay ** torch.arange(n, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0.0
    return U, s, V, (U[:, :n] * s) @ V.T


def _rotation(m: int, a: torch.Tensor, b: torch.Tensor, phi_deg: float) -> torch.Tensor:
    """(m, m) rotation by phi in the plane of the orthonormal vectors a, b (identity on its complement)."""
    phi = math.radians(phi_deg)
    P = torch.outer(a, a) + torch.outer(b, b)
    J = torch.outer(b, a) - torch.outer(a, b)  # a -> b, b -> -a
    return torch.eye(m, dtype=torch.float64) + (math.cos(phi) - 1.0) * P + math.sin(phi) * J


# ----------------------------------------------------------------------------------------- names
def test_names_map_to_module_types_and_layers() -> None:
    assert D.module_type("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert D.module_type("model.layers.3.mlp.down_proj.weight") == "down_proj"
    assert D.module_type("model.embed_tokens.weight") == "embed"
    assert D.module_type("model.layers.0.post_attention_layernorm.weight") == "norm"
    assert D.module_type("model.norm.weight") == "norm"
    assert D.module_type("lm_head.weight") == "lm_head"
    assert D.layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert D.layer_index("base_model.model.model.layers.7.self_attn.v_proj.weight") == 7
    assert D.layer_index("model.embed_tokens.weight") is None


# ----------------------------------------------------------------------------------------- angles
def test_principal_angles_of_a_known_rotation() -> None:
    A = _orthonormal(10, 3, seed=3)
    extra = _orthonormal(10, 4, seed=4)
    # a unit vector orthogonal to span(A)
    w = extra[:, 0] - A @ (A.T @ extra[:, 0])
    w = w / w.norm()
    R = _rotation(10, A[:, 0], w, 30.0)
    ang = D.principal_angles(A, R @ A)
    assert ang.tolist() == pytest.approx([0.0, 0.0, 30.0], abs=1e-6)
    assert D.principal_angles(A, A).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        D.principal_angles(A, A[:, :2])


def test_rotation_in_a_known_plane_changes_left_subspace_only() -> None:
    k, phi = 4, 40.0
    U, s, V, W0 = _known_svd()
    # Rotate the leading left singular vector towards u_30, which W0 does not use (m = 40 > n = 24).
    R = _rotation(40, U[:, 0], U[:, 30], phi)
    Wt = R @ W0
    rec = D.spectral_drift_matrix(W0.float(), Wt.float(), k=k)
    assert rec["angle_left_deg"] == pytest.approx(phi, abs=1e-2)
    assert rec["cos2_left"] == pytest.approx((k - 1 + math.cos(math.radians(phi)) ** 2) / k, abs=1e-4)
    assert rec["angle_right_deg"] == pytest.approx(0.0, abs=1e-2)
    assert rec["cos2_right"] == pytest.approx(1.0, abs=1e-5)
    assert rec["sv_rel_change"] == pytest.approx(0.0, abs=1e-5)  # rotations keep singular values
    # dW = s1 [(cos phi - 1) u1 + sin phi w] v1^T: inside part (1 - cos phi)^2 of 2 (1 - cos phi).
    assert rec["inside_fraction"] == pytest.approx(math.sin(math.radians(phi) / 2) ** 2, abs=1e-4)
    assert rec["cross_fraction"] == pytest.approx(1 - math.sin(math.radians(phi) / 2) ** 2, abs=1e-4)
    assert rec["outside_fraction"] == pytest.approx(0.0, abs=1e-4)


def test_rotation_outside_the_top_k_is_invisible_to_the_subspace() -> None:
    U, s, V, W0 = _known_svd()
    # Rotating u_10 (not in the top 4) towards u_30 moves no top-4 direction: the update lies outside.
    Wt = _rotation(40, U[:, 10], U[:, 30], 25.0) @ W0
    rec = D.spectral_drift_matrix(W0.float(), Wt.float(), k=4)
    assert rec["angle_left_deg"] == pytest.approx(0.0, abs=1e-2)
    assert rec["outside_fraction"] == pytest.approx(1.0, abs=1e-4)
    assert rec["inside_fraction"] + rec["cross_fraction"] == pytest.approx(0.0, abs=1e-4)


def test_scaling_is_pure_inside_for_rank_k_and_partly_for_full_rank() -> None:
    k = 5
    _, s, _, W0 = _known_svd(rank=k)
    rec = D.spectral_drift_matrix(W0.float(), 1.5 * W0.float(), k=k)
    assert rec["angle_left_deg"] == pytest.approx(0.0, abs=1e-2)
    assert rec["angle_right_deg"] == pytest.approx(0.0, abs=1e-2)
    assert rec["inside_fraction"] == pytest.approx(1.0, abs=1e-5)
    assert rec["sv_rel_change"] == pytest.approx(0.5, abs=1e-5)
    assert rec["top_sv_rel_change"] == pytest.approx(0.5, abs=1e-5)
    # Full rank: dW = 0.5 W0 has a share sum_{i<=k} s_i^2 / sum s_i^2 inside the top-k subspace.
    _, s, _, W0 = _known_svd()
    rec = D.spectral_drift_matrix(W0.float(), 0.8 * W0.float(), k=k)
    expected = float((s[:k] ** 2).sum() / (s**2).sum())
    assert rec["inside_fraction"] == pytest.approx(expected, abs=1e-5)
    assert rec["outside_fraction"] == pytest.approx(1 - expected, abs=1e-5)
    assert rec["top_sv_rel_change"] == pytest.approx(-0.2, abs=1e-5)


def test_lowrank_agrees_with_exact_on_a_decaying_spectrum() -> None:
    U, s, V, W0 = _known_svd(m=60, n=50, seed=5, decay=0.8)
    g = torch.Generator().manual_seed(0)
    Wt = W0 + 0.05 * torch.randn(W0.shape, generator=g, dtype=torch.float64)
    ex = D.spectral_drift_matrix(W0.float(), Wt.float(), k=4, method="exact")
    lr = D.spectral_drift_matrix(W0.float(), Wt.float(), k=4, method="lowrank")
    for key in ("inside_fraction", "cross_fraction", "sv_rel_change", "angle_left_deg", "angle_right_deg"):
        assert lr[key] == pytest.approx(ex[key], rel=1e-2, abs=1e-3), key
    with pytest.raises(ValueError, match="allowed: exact, lowrank"):
        D.top_k_svd(W0.float(), 4, method="randomized")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- state dicts
def _tiny_model(seed: int = 0, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def _perturbed(state: dict, scale: float = 0.05, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_identical_weights_have_zero_drift() -> None:
    state = {k: v.clone() for k, v in _tiny_model().state_dict().items()}
    out = D.drift_summary(state, {k: v.clone() for k, v in state.items()}, k=4)
    rel = {k: v for k, v in out.items() if k.startswith("param/rel_fro/")}
    assert set(rel) >= {
        "param/rel_fro/q_proj",
        "param/rel_fro/embed",
        "param/rel_fro/norm",
        "param/rel_fro/layer_00",
        "param/rel_fro/layer_01",
        "param/rel_fro/all",
    }
    assert all(v == 0.0 for v in rel.values())
    for key, v in out.items():
        if "angle" in key or "sv_rel_change" in key:
            assert v == pytest.approx(0.0, abs=1e-3), key
        if "cos2" in key:
            assert v == pytest.approx(1.0, abs=1e-6), key
    assert not any("fraction" in key for key in out)  # undefined without an update
    json.dumps(out)  # JSON-serialisable


def test_parameter_drift_pools_groups_by_energy() -> None:
    base = {
        "model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2),  # ||.||^2 = 4
        "model.layers.1.self_attn.q_proj.weight": torch.ones(1, 1),  # 1
        "model.layers.0.mlp.up_proj.weight": torch.full((1, 4), 2.0),  # 16
        "model.norm.weight": torch.ones(4),  # 4
    }
    new = dict(base)
    new["model.layers.0.self_attn.q_proj.weight"] = torch.ones(2, 2) * 2.0  # diff^2 = 4
    new["model.norm.weight"] = torch.tensor([1.0, 1.0, 1.0, 3.0])  # diff^2 = 4
    out = D.parameter_drift(base, new)
    assert out["param/rel_fro/q_proj"] == pytest.approx(math.sqrt(4 / 5))
    assert out["param/rel_fro/up_proj"] == 0.0
    assert out["param/rel_fro/attn"] == pytest.approx(math.sqrt(4 / 5))
    assert out["param/rel_fro/layer_00"] == pytest.approx(math.sqrt(4 / 20))
    assert out["param/rel_fro/layer_01"] == 0.0
    assert out["param/rel_fro/norm"] == pytest.approx(1.0)
    assert out["param/rel_fro/all"] == pytest.approx(math.sqrt(8 / 25))


def test_mismatched_state_dicts_are_rejected() -> None:
    base = {"a.weight": torch.ones(2, 2), "b.weight": torch.ones(3)}
    with pytest.raises(ValueError, match="only in base \\['b.weight'\\]"):
        D.parameter_drift(base, {"a.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="'a.weight' has shape \\(2, 2\\)"):
        D.parameter_drift(base, {"a.weight": torch.ones(2, 3), "b.weight": torch.ones(3)})


def test_summary_of_a_perturbed_model_and_base_cache() -> None:
    base = {k: v.clone() for k, v in _tiny_model().state_dict().items()}
    new = _perturbed(base)
    cache: dict = {}
    out = D.drift_summary(base, new, k=4, base_cache=cache)
    assert len(cache) == 2 * 7  # 2 layers x 7 matrices
    again = D.drift_summary(base, new, k=4, base_cache=cache)
    assert again == out
    for group in (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "attn",
        "mlp",
        "all",
    ):
        fr = [out[f"spectral/{f}_fraction/{group}"] for f in ("inside", "cross", "outside")]
        assert sum(fr) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= x <= 1.0 for x in fr)
    assert out["param/rel_fro/all"] > 0
    assert out["spectral/k"] == 4.0


def test_tied_head_is_counted_once() -> None:
    model = _tiny_model()
    state = model.state_dict()
    assert "lm_head.weight" in state  # tied: the same storage as the embedding
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    new = {k: v.clone() for k, v in state.items()}  # clones: no longer shared
    new["lm_head.weight"] = new["model.embed_tokens.weight"]
    out = D.parameter_drift(state, new)
    assert "param/rel_fro/lm_head" not in out
    # a copy that equals the embedding is dropped by the CLI's loader
    untied = analyze._drop_tied_head({k: v.clone() for k, v in state.items()})
    assert "lm_head.weight" not in untied and "model.embed_tokens.weight" in untied


# ----------------------------------------------------------------------------------------- the run's observer
class _Backbone:
    def __init__(self, model):
        self.model = model


class _Entry:
    def __init__(self):
        self.drift, self.seconds = None, {}


def _train_a_little(model) -> None:
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_drift_observer_counts_a_tied_head_once() -> None:
    """The observer's base copy once held the tied head as a tensor of its own, so a run's drift reported a
    ``param/rel_fro/lm_head`` group and counted the embedding twice in ``all`` (the CLI, reading checkpoint
    files, counted it once): the run's numbers are now the analysis of the live weights."""
    import threading

    from conftest import ThreadRanks

    from opr.observers import DriftObserver

    model = _tiny_model(0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    one = ThreadRanks(0, 1, [None], threading.Barrier(1))  # one process: all_gather gives [obj]
    observer = DriftObserver(_Backbone(model), k=4, svd="exact", ranks=one)
    _train_a_little(model)
    entry = _Entry()
    observer.on_stage_end(1, entry, cached=False)
    base["lm_head.weight"] = base["model.embed_tokens.weight"]  # tied in the base as in the model
    assert entry.drift == D.drift_summary(base, model.state_dict(), k=4)
    assert "param/rel_fro/lm_head" not in entry.drift and "lm_head.weight" not in observer.base_state


@pytest.mark.parametrize("world", [2, 3])
def test_drift_shared_by_ranks_is_one_process_drift(world) -> None:
    """Each rank keeps the base weights of its share only, decomposes only those, and all ranks get one process's
    summary, bit for bit (the terms are pooled in the one process's order)."""
    from conftest import on_thread_ranks

    from opr.observers import DriftObserver

    models = [_tiny_model(0) for _ in range(world + 1)]  # built here: the global RNG is no thread's to seed

    def stage_drift(ranks, offset=0):
        model = models[offset + ranks.rank]
        observer = DriftObserver(_Backbone(model), k=4, svd="exact", ranks=ranks)
        _train_a_little(model)
        entries = [_Entry(), _Entry()]
        observer.on_stage_end(1, entries[0], cached=False)
        _train_a_little(model)  # a second stage: the base factors come from the cache
        observer.on_stage_end(2, entries[1], cached=False)
        return [e.drift for e in entries], sorted(observer.base_state)

    (single, all_names), = on_thread_ranks(1, lambda ranks: stage_drift(ranks, offset=world))
    shared = on_thread_ranks(world, stage_drift)
    for drifts, _ in shared:
        assert drifts == single
    shares = [names for _, names in shared]
    assert all(shares) and sorted(n for names in shares for n in names) == all_names  # disjoint, all covered
    assert max(len(names) for names in shares) < len(all_names)
    assert single[0] != single[1] and "spectral/k" in single[0]


def test_drift_shares_balance_the_svd_work() -> None:
    state = _tiny_model(0).state_dict()
    shares = D.drift_shares(state, 2)
    assert shares == D.drift_shares(state, 2)  # deterministic: every rank computes the same split
    named = [n for n, _, _ in D.paired_parameters(state, state)]
    assert sorted(shares[0] + shares[1]) == sorted(named) and "lm_head.weight" not in named
    for share in shares:  # each share in state order
        assert share == [n for n in named if n in share]

    def cost(name):
        w = state[name]
        spectral = w.dim() == 2 and D.module_type(name) in D.SPECTRAL_MODULES
        return w.shape[0] * w.shape[1] * min(w.shape) if spectral else w.numel()

    loads = [sum(cost(n) for n in share) for share in shares]
    assert max(loads) - min(loads) <= max(cost(n) for n in named)  # greedy: within one item's cost
    assert D.drift_shares(state, len(named) + 2)[-1] == []  # more ranks than parameters
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        D.drift_shares(state, 0)


# ----------------------------------------------------------------------------------------- KL
def test_next_token_kl_zero_for_identical_models_positive_otherwise() -> None:
    base = _tiny_model(0)
    same = _tiny_model(0)
    other = _tiny_model(1)
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids[0, :3] = 0
    assert D.next_token_kl(base, same, ids, mask, batch_size=2) == pytest.approx(0.0, abs=1e-6)
    kl = D.next_token_kl(base, other, ids, mask, batch_size=2)
    assert kl > 0.0
    # left padding must not change a sequence's contribution: the padded row alone equals the unpadded one
    solo = D.next_token_kl(base, other, ids[:1, 3:], None)
    padded = D.next_token_kl(base, other, ids[:1], mask[:1])
    assert padded == pytest.approx(solo, rel=1e-4)
    # token-weighted mean over the batch: 4 + 7 + 7 positions
    rows = [D.next_token_kl(base, other, ids[i : i + 1], mask[i : i + 1]) for i in range(3)]
    assert kl == pytest.approx((4 * rows[0] + 7 * rows[1] + 7 * rows[2]) / 18, rel=1e-4)
    with pytest.raises(ValueError, match="no non-pad"):
        D.next_token_kl(base, other, ids, torch.zeros_like(ids))


# ----------------------------------------------------------------------------------------- CLI
def test_cli_on_saved_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from opr.backbones import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    base = _tiny_model(0, vocab=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    ckroot = tmp_path / "run" / "checkpoints"
    for stage, scale in ((1, 0.01), (2, 0.05)):
        m = _tiny_model(0, vocab=len(tok))
        m.load_state_dict(_perturbed(m.state_dict(), scale=scale, seed=stage))
        d = ckroot / f"stage{stage}"
        m.save_pretrained(d)
        (d / "stage.json").write_text(json.dumps({"stage": stage}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n\n{"prompt": "2+2="}\n')
    out = tmp_path / "drift.json"
    rc = analyze.main(
        [str(tmp_path / "base"), str(ckroot), "--k", "4", "--out", str(out), "--prompts", str(prompts)]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert [Path(c["path"]).name for c in res["checkpoints"]] == ["stage1", "stage2"]
    d1, d2 = (c["drift"] for c in res["checkpoints"])
    assert 0 < d1["param/rel_fro/all"] < d2["param/rel_fro/all"]
    assert 0 < d1["response/next_token_kl"] < d2["response/next_token_kl"]
    printed = capsys.readouterr().out
    assert "stage2" in printed and "rel_fro" in printed
    stage_rows = [line for line in printed.splitlines() if "checkpoints/stage" in line]
    assert [r.split()[-2] for r in stage_rows] == ["-", "-"] and "scores" not in res["checkpoints"][0]  # no run
    # the base against itself: zero drift
    rc = analyze.main([str(tmp_path / "base"), str(tmp_path / "base"), "--k", "4"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["checkpoints"][0]["drift"]["param/rel_fro/all"] == 0.0


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze.main([str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="field 'prompt'"):
        analyze.read_prompts(bad)


def test_cli_gives_each_stage_checkpoint_its_runs_ood_score_and_plots_it(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from opr.backbones import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    _tiny_model(0, vocab=len(tok)).save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    for stage, scale in ((1, 0.01), (2, 0.05)):
        m = _tiny_model(0, vocab=len(tok))
        m.load_state_dict(_perturbed(m.state_dict(), scale=scale, seed=stage))
        m.save_pretrained(run / "checkpoints" / f"stage{stage}")
        (run / "checkpoints" / f"stage{stage}" / "stage.json").write_text(json.dumps({"stage": stage}))
    m = _tiny_model(0, vocab=len(tok))  # sft_then_grpo's phase checkpoint, scored by its curve point
    m.load_state_dict(_perturbed(m.state_dict(), scale=0.005, seed=9))
    m.save_pretrained(run / "checkpoints" / "stage1_sft")
    curve = [{"stage_step": 2, "phase": "sft", "scores": {"a": 70.0, "general": 30.0}},
             {"stage_step": 4, "phase": "sft", "scores": {"a": 80.0, "general": 20.0}},
             {"stage_step": 6, "phase": "rl", "scores": {"a": 85.0, "general": 25.0}}]
    (run / "results.json").write_text(json.dumps({
        "tasks": ["a", "b"], "matrix": [[10.0, 20.0], [90.0, 20.0], [50.0, 80.0]],
        "stages": [{"stage": 1, "curve": curve}],
        "general": {"tasks": ["general", "other"], "matrix": [[58.0, 42.0], [10.0, 20.0], [14.0, 0.0]]}}))
    out, plot = tmp_path / "drift.json", tmp_path / "ood.png"
    assert analyze.main([str(tmp_path / "base"), str(run / "checkpoints"), "--k", "4", "--out", str(out),
                         "--plot", str(plot)]) == 0
    res = json.loads(out.read_text())
    assert res["base_scores"] == {"ood": 50.0, "tasks": {"a": 10.0, "b": 20.0}}  # row 0, mean of the sets
    assert [Path(c["path"]).name for c in res["checkpoints"]] == ["stage1_sft", "stage1", "stage2"]
    s0, s1, s2 = (c["scores"] for c in res["checkpoints"])
    assert s0 == {"stage": "1_sft", "ood": 20.0, "tasks": {"a": 80.0}}  # the last sft point; 'general' only
    assert s1 == {"stage": 1, "ood": 15.0, "tasks": {"a": 90.0, "b": 20.0}}
    assert s2 == {"stage": 2, "ood": 7.0, "tasks": {"a": 50.0, "b": 80.0}}
    table = capsys.readouterr()
    assert [line.split()[-2] for line in table.out.splitlines()[1:5]] == ["50.0", "20.0", "15.0", "7.0"]
    assert "wrote" in table.err and "(4 points)" in table.err and plot.stat().st_size > 10_000
    angles = [analyze.mean_angle(c["drift"]) for c in res["checkpoints"]]
    assert 0 < angles[0] < angles[1] < angles[2]  # perturbed by 0.005 < 0.01 < 0.05
    # claim 4's numbers over base + 3 checkpoints: rotation rises while OOD falls 50 > 20 > 15 > 7, so rho = -1,
    # and of the 4! orderings only this one and its reverse reach |rho| = 1
    corr = res["ood_correlation"]
    assert corr["rotation"]["rho"] == pytest.approx(-1.0) and corr["rotation"]["n"] == 4
    assert corr["rotation"]["p"] == pytest.approx(2 / 24) and corr["sv_change"]["n"] == 4
    assert "Spearman rho(OOD, mean rotation angle) = -1.00 (n = 4, p = 0.0833" in table.out
    # a plain model folder has no run scores: --plot refuses, the JSON is still written
    out2 = tmp_path / "drift2.json"
    assert analyze.main([str(tmp_path / "base"), str(tmp_path / "base"), "--k", "4", "--out", str(out2),
                         "--plot", str(tmp_path / "none.png")]) == 2
    assert "no checkpoint has an OOD score" in capsys.readouterr().err
    assert out2.is_file() and not (tmp_path / "none.png").exists()


def test_a_runs_drift_is_the_cli_analysis_of_its_checkpoints(tmp_path: Path) -> None:
    """The drift a run records at each stage equals ``python -m opr.tools.analyze`` over the stage checkpoints it
    saved (the tiny model ties its output layer to the embedding): before the observer counted the tied head
    once, the run reported an extra ``lm_head`` group and a larger ``all``."""
    from conftest import TINY, compose_cfg

    from opr.config import build
    from opr.run import run_experiment

    run_dir = tmp_path / "run"
    cfg = compose_cfg(TINY + ["method=seq_sft", "analysis.diagnostics=false", "analysis.svd=exact", "analysis.k=4",
                              "checkpoint.save=true", "checkpoint.keep_last=0"], run_dir)
    record = run_experiment(cfg)
    base = build(cfg.backbone, seed=cfg.seed)  # the run's base weights, built again from its seed
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "drift.json"
    assert analyze.main([str(tmp_path / "base"), str(run_dir / "checkpoints"), "--k", "4", "--out", str(out)]) == 0
    cli = [c["drift"] for c in json.loads(out.read_text())["checkpoints"]]
    ran = [s["drift"] for s in record["stages"][1:]]
    assert len(cli) == len(ran) == 2
    for a, b in zip(ran, cli):
        assert "param/rel_fro/lm_head" not in a and set(a) <= set(b)
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
