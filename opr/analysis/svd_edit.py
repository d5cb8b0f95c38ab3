"""Singular-vector edits: put chosen singular components of a reference model back into a fine-tuned one.

"RL Fine-Tuning Heals OOD Forgetting in SFT" (2025) reports that fine-tuning leaves singular values nearly
unchanged while out-of-distribution ability tracks the *rotation* of singular vectors, and that editing the
vectors back restores the ability. Its edit (``analysis/svd_recover.py`` of github.com/xiaodanguoguo/RL_Heals_SFT)
takes every 2-D weight of the end-of-SFT checkpoint (the *target*) and replaces its top-k and its tail-k
singular triplets (left vector, value, right vector) with those of a *reference* checkpoint (there: the SFT
checkpoint with the best OOD score), keeping the middle components of the target; k = 100 each by default.
That is ``vectors="reference", values="reference"`` below. The two other combinations separate the parts:
``vectors="reference", values="target"`` restores only the rotation (the reference's directions with the
fine-tuned singular values), ``vectors="target", values="reference"`` only the spectrum.

Mixing components of two SVDs gives a matrix whose left (right) vectors need not be orthonormal as a set; the
edit is still a well-defined weight (the paper's construction), just not itself an SVD.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from opr.analysis.drift import module_type

Source = Literal["reference", "target"]
SOURCES = ("reference", "target")


def svd_edit(W_ref: Tensor, W_tgt: Tensor, top_k: int, tail_k: int, vectors: Source = "reference",
             values: Source = "reference") -> Tensor:
    """``W_tgt`` [m, n] with its ``top_k`` largest and ``tail_k`` smallest singular components replaced:
    the singular vectors from ``vectors`` and the singular values from ``values`` (each ``reference`` = ``W_ref``
    [m, n] or ``target`` = ``W_tgt``); the components in between stay the target's. Returns [m, n] in
    ``W_tgt``'s dtype. With r = min(m, n): k's are capped so that top_k + tail_k <= r; both 0 returns ``W_tgt``.

        W_ref = U_r S_r V_rᵀ,  W_tgt = U_t S_t V_tᵀ  (thin SVDs, float32)
        edited = Σ_{i in top ∪ tail} u_i(vectors) s_i(values) v_i(vectors)ᵀ + Σ_{i in middle} u_t,i s_t,i v_t,iᵀ
    """
    if W_ref.shape != W_tgt.shape or W_ref.dim() != 2:
        raise ValueError(f"svd_edit needs two 2-D matrices of one shape, got {tuple(W_ref.shape)} and "
                         f"{tuple(W_tgt.shape)}")
    if top_k < 0 or tail_k < 0:
        raise ValueError(f"top_k and tail_k must be >= 0, got {top_k}, {tail_k}")
    for name, value in (("vectors", vectors), ("values", values)):
        if value not in SOURCES:
            raise ValueError(f"{name} must be one of {list(SOURCES)}, got {value!r}")
    if top_k == 0 and tail_k == 0:
        return W_tgt
    r = min(W_tgt.shape)
    top_k = min(top_k, r)
    tail_k = min(tail_k, r - top_k)
    Ur, Sr, Vhr = torch.linalg.svd(W_ref.float(), full_matrices=False)  # [m, r], [r], [r, n]
    Ut, St, Vht = torch.linalg.svd(W_tgt.float(), full_matrices=False)
    chosen = torch.zeros(r, dtype=torch.bool)
    chosen[:top_k] = True
    chosen[r - tail_k:] = True
    U = torch.where(chosen, Ur if vectors == "reference" else Ut, Ut)  # columns: [m, r]
    Vh = torch.where(chosen[:, None], Vhr if vectors == "reference" else Vht, Vht)  # rows: [r, n]
    S = torch.where(chosen, Sr if values == "reference" else St, St)  # [r]
    return ((U * S) @ Vh).to(W_tgt.dtype)


def editable(name: str, tensor: Tensor, modules: Iterable[str] | None) -> bool:
    """A 2-D weight whose module type (``q_proj`` ... ``down_proj``, ``embed``, ``lm_head``) is in ``modules``
    (None: every 2-D weight, as the paper did)."""
    if tensor.dim() != 2:
        return False
    return modules is None or module_type(name) in set(modules)


def edit_state(reference: Mapping[str, Tensor], target: Mapping[str, Tensor], top_k: int, tail_k: int,
               vectors: Source = "reference", values: Source = "reference",
               modules: Iterable[str] | None = None, layers: str | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """Apply :func:`svd_edit` to every chosen weight of ``target`` (name -> tensor) that ``reference`` also has;
    ``layers`` is a regular expression a weight's name must match (e.g. ``r"layers\\.(2[0-9])\\."``). Returns
    the edited state (other tensors untouched) and the edited names."""
    pattern = re.compile(layers) if layers else None
    out, edited = dict(target), []
    for name, W in target.items():
        if name not in reference or not editable(name, W, modules):
            continue
        if pattern is not None and not pattern.search(name):
            continue
        out[name] = svd_edit(reference[name], W, top_k, tail_k, vectors, values)
        edited.append(name)
    return out, edited


def matched_interpolation(reference: Mapping[str, Tensor], target: Mapping[str, Tensor],
                          edited: Mapping[str, Tensor], names: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The control for an edit: each weight ``n`` in ``names`` moved along its own fine-tuning delta,
    ``W_ref + α_n (W_tgt − W_ref)`` with ``α_n = ‖W_edit − W_ref‖_F / ‖W_tgt − W_ref‖_F`` (1 when the delta is 0),
    so that it lies as far from the reference as the edited weight does, but without regard to singular
    vectors; other tensors stay the target's. Returns the state and the α per weight. An edit that restores an
    ability its matched interpolation does not restores it through the directions it puts back, not through
    how far it moves the weights."""
    out, alphas = dict(target), {}
    for name in names:
        delta = target[name].float() - reference[name].float()
        norm = float(delta.norm())
        alpha = float((edited[name].float() - reference[name].float()).norm()) / norm if norm > 0 else 1.0
        out[name] = (reference[name].float() + alpha * delta).to(target[name].dtype)
        alphas[name] = alpha
    return out, alphas


def write_edited_model(reference_dir: Path, target_dir: Path, out_dir: Path, control: bool = False,
                       **options) -> list[str]:
    """Load two ``transformers`` model folders, edit the target (:func:`edit_state` options), and save the
    result with the target's tokenizer as a plain model folder that ``from_pretrained`` and ``opr.tools.score``
    load. Returns the edited weight names. ``control``: save the edit's :func:`matched_interpolation` instead
    (and its α per weight as ``interpolation_alphas.json`` in ``out_dir``)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=torch.float32)
    tgt = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    state, edited = edit_state(ref.state_dict(), tgt.state_dict(), **options)
    alphas = None
    if control and edited:
        state, alphas = matched_interpolation(ref.state_dict(), tgt.state_dict(), state, edited)
    if not edited:
        raise ValueError("no weight was edited: check --modules / --layers against the model's parameter names")
    tgt.load_state_dict(state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tgt.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(target_dir)).save_pretrained(out_dir)
    if alphas is not None:
        (out_dir / "interpolation_alphas.json").write_text(json.dumps(alphas, indent=1), encoding="utf-8")
    return edited
