"""Singular-vector edits (opr.analysis.svd_edit) on matrices whose SVDs are known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from opr.analysis.svd_edit import edit_state, matched_interpolation, svd_edit


def rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# W = U diag(S) Vᵀ with U, V orthonormal by construction (S descending, distinct: the SVD is unique up to signs)
U_REF, S_REF, V_REF = torch.eye(3), torch.tensor([3.0, 2.0, 1.0]), torch.eye(3)
U_TGT, S_TGT, V_TGT = rotation(0.3), torch.tensor([6.0, 4.0, 0.5]), rotation(-0.2)
W_REF = U_REF @ torch.diag(S_REF) @ V_REF.T
W_TGT = U_TGT @ torch.diag(S_TGT) @ V_TGT.T


def component(U, S, V, i):
    return S[i] * torch.outer(U[:, i], V[:, i])


def test_nothing_chosen_returns_the_target():
    assert torch.equal(svd_edit(W_REF, W_TGT, 0, 0), W_TGT)


def test_all_components_from_the_reference_give_the_reference():
    assert torch.allclose(svd_edit(W_REF, W_TGT, 3, 0), W_REF, atol=1e-5)
    assert torch.allclose(svd_edit(W_REF, W_TGT, 2, 5), W_REF, atol=1e-5)  # k's capped at rank 3


def test_top1_and_tail1_from_the_reference_keep_the_targets_middle():
    # the paper's edit: triplets 0 and 2 from the reference, triplet 1 from the target
    expected = component(U_REF, S_REF, V_REF, 0) + component(U_TGT, S_TGT, V_TGT, 1) + component(U_REF, S_REF, V_REF, 2)
    assert torch.allclose(svd_edit(W_REF, W_TGT, 1, 1), expected, atol=1e-5)


def test_rotation_only_and_spectrum_only():
    # reference directions with the target's values: 6 u_r0 v_r0ᵀ + middle of the target
    rot = svd_edit(W_REF, W_TGT, 1, 0, vectors="reference", values="target")
    expected = 6.0 * torch.outer(U_REF[:, 0], V_REF[:, 0]) + component(U_TGT, S_TGT, V_TGT, 1) \
        + component(U_TGT, S_TGT, V_TGT, 2)
    assert torch.allclose(rot, expected, atol=1e-5)
    spec = svd_edit(W_REF, W_TGT, 1, 0, vectors="target", values="reference")
    expected = 3.0 * torch.outer(U_TGT[:, 0], V_TGT[:, 0]) + component(U_TGT, S_TGT, V_TGT, 1) \
        + component(U_TGT, S_TGT, V_TGT, 2)
    assert torch.allclose(spec, expected, atol=1e-5)
    # the spectrum-only edit changes no direction: the singular vectors stay the target's (up to sign)
    U, S, Vh = torch.linalg.svd(spec)
    assert torch.allclose(S, torch.tensor([4.0, 3.0, 0.5]), atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="one shape"):
        svd_edit(W_REF, torch.zeros(2, 3), 1, 0)
    with pytest.raises(ValueError, match="vectors must be one of"):
        svd_edit(W_REF, W_TGT, 1, 0, vectors="base")
    with pytest.raises(ValueError, match=">= 0"):
        svd_edit(W_REF, W_TGT, -1, 0)


def test_edit_state_chooses_module_types_and_layers():
    ref = {"model.layers.0.self_attn.q_proj.weight": W_REF, "model.layers.1.mlp.up_proj.weight": W_REF,
           "model.norm.weight": torch.ones(3)}
    tgt = {k: (W_TGT if v.dim() == 2 else 2 * v) for k, v in ref.items()}
    state, edited = edit_state(ref, tgt, 3, 0, modules=["q_proj"])
    assert edited == ["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(state[edited[0]], W_REF, atol=1e-5)
    assert torch.equal(state["model.layers.1.mlp.up_proj.weight"], W_TGT)
    assert torch.equal(state["model.norm.weight"], 2 * torch.ones(3))  # 1-D: never edited
    _, edited = edit_state(ref, tgt, 1, 0, layers=r"layers\.1\.")
    assert edited == ["model.layers.1.mlp.up_proj.weight"]


def test_cli_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from opr.backbones import load_tiny
    from opr.tools.analyze import main

    for name, seed in (("ref", 0), ("tgt", 1)):
        bb = load_tiny(seed=seed)
        bb.model.save_pretrained(tmp_path / name)
        bb.tokenizer.save_pretrained(tmp_path / name)
    rc = main(["edit", str(tmp_path / "ref"), str(tmp_path / "tgt"), str(tmp_path / "out"), "--top-k", "1000",
               "--tail-k", "0", "--modules", "q_proj"])
    assert rc == 0
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ref")).state_dict()
    tgt = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tgt")).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(out[q], ref[q], atol=1e-5)  # all components restored = the reference's matrix
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(out[k], tgt[k])
    assert main(["edit", str(tmp_path / "nope"), str(tmp_path / "tgt"), str(tmp_path / "o2")]) == 2


def test_matched_interpolation_moves_along_the_delta_to_the_edits_distance():
    """By hand: W_ref = diag(3, 2, 1); the edit restores the top component only. The control lies on the line
    W_ref + α (W_tgt − W_ref) at the edited weight's distance from W_ref; a weight whose delta is 0 keeps α = 1."""
    ref, tgt = {"w": W_REF, "same": W_REF.clone()}, {"w": W_TGT, "same": W_REF.clone()}
    edited, names = edit_state(ref, tgt, 1, 0)
    out, alphas = matched_interpolation(ref, tgt, edited, names)
    alpha = float((edited["w"] - W_REF).norm() / (W_TGT - W_REF).norm())
    assert alphas["w"] == pytest.approx(alpha) and alphas["same"] == 1.0
    assert torch.allclose(out["w"], W_REF + alpha * (W_TGT - W_REF), atol=1e-6)
    assert float((out["w"] - W_REF).norm()) == pytest.approx(float((edited["w"] - W_REF).norm()), rel=1e-5)
    assert torch.equal(out["same"], W_REF)
    # restoring every component gives the reference: distance 0, so the control is the reference too
    edited, names = edit_state(ref, tgt, 3, 0)
    out, alphas = matched_interpolation(ref, tgt, edited, names)
    assert alphas["w"] == pytest.approx(0.0, abs=1e-6) and torch.allclose(out["w"], W_REF, atol=1e-5)


def test_cli_control_writes_the_matched_interpolation(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from opr.backbones import load_tiny
    from opr.tools.analyze import main

    for name, seed in (("ref", 0), ("tgt", 1)):
        bb = load_tiny(seed=seed)
        bb.model.save_pretrained(tmp_path / name)
        bb.tokenizer.save_pretrained(tmp_path / name)
    args = [str(tmp_path / "ref"), str(tmp_path / "tgt"), "--top-k", "2", "--tail-k", "0", "--modules", "q_proj",
            "--values", "target"]
    assert main(["edit", args[0], args[1], str(tmp_path / "edit"), *args[2:]]) == 0
    assert main(["edit", args[0], args[1], str(tmp_path / "ctrl"), *args[2:], "--control"]) == 0
    load = {n: AutoModelForCausalLM.from_pretrained(str(tmp_path / n)).state_dict() for n in ("ref", "tgt", "edit", "ctrl")}
    alphas = json.loads((tmp_path / "ctrl" / "interpolation_alphas.json").read_text())
    q = "model.layers.0.self_attn.q_proj.weight"
    ref, tgt, edit, ctrl = (load[n][q] for n in ("ref", "tgt", "edit", "ctrl"))
    assert torch.allclose(ctrl, ref + alphas[q] * (tgt - ref), atol=1e-6)
    assert float((ctrl - ref).norm()) == pytest.approx(float((edit - ref).norm()), rel=1e-4)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(load["ctrl"][k], load["tgt"][k]) and k not in alphas
