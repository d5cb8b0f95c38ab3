"""Weight-space and response-space drift between a base model and a later checkpoint of it.

Everything here is a pure function of state dicts (``dict[str, Tensor]``, HF Llama naming:
``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ``model.norm.weight`` ...) or of
two models, so that a run can log a flat summary per stage and ``python -m opr.tools.analyze`` can compute the
same numbers from saved checkpoint folders afterwards.

Definitions (W_0: the base weight, W_t: the same weight after training, dW = W_t - W_0):

Parameter drift
    rel_fro(W) = ||W_t - W_0||_F / ||W_0||_F. A group of parameters (a module type, a layer, everything) is
    pooled: sqrt(Σ ||dW||_F^2) / sqrt(Σ ||W_0||_F^2), i.e. the relative drift of the group's parameters seen
    as one vector (big matrices weigh more than small ones; a LayerNorm gain cannot dominate).

Spectral drift of a 2-D attention / MLP weight (m x n), with the thin SVDs
W_0 = U Σ V^T and W_t = U' Σ' V'^T and their top-k parts U_k (m x k), V_k (n x k), σ_k (k,)::

    sv_rel_change      ||σ'_k - σ_k||_2 / ||σ_k||_2 (both sorted descending; >= 0).
    top_sv_rel_change  (σ'_1 - σ_1) / σ_1 (signed: > 0 when the leading direction was amplified).
    cos2_left          mean_i cos^2 θ_i over the k principal angles θ_1 <= ... <= θ_k between span(U_k) and
                       span(U'_k) (= ||U_k^T U'_k||_F^2 / k; 1 = same subspace, 0 = orthogonal).
    angle_left_deg     θ_k, the largest of those angles, in degrees (0 = same subspace, 90 = a direction of
                       one subspace is orthogonal to the other).
    cos2_right / angle_right_deg  the same for the right singular subspaces span(V_k), span(V'_k).
    inside_fraction    ||P_U dW P_V||_F^2 / ||dW||_F^2 with P_U = U_k U_k^T, P_V = V_k V_k^T: the share of the
                       update's energy that only rescales / mixes inside the base's principal subspace.
    cross_fraction     (||P_U dW (I-P_V)||_F^2 + ||(I-P_U) dW P_V||_F^2) / ||dW||_F^2: the share that couples
                       a principal direction with an outside one (what rotates the principal subspace).
    outside_fraction   ||(I-P_U) dW (I-P_V)||_F^2 / ||dW||_F^2: the share entirely outside it.
    The three fractions are an orthogonal decomposition of dW, so they sum to 1. They are pooled over a group of
    matrices by energy (Σ numerators / Σ ||dW||_F^2), and are absent for a group whose update is exactly zero.
    The other spectral numbers are plain means over the group's matrices.

    A top-k subspace is only well defined when σ_k > σ_{k+1}; near-degenerate spectra (random init) make the
    angles sensitive to noise, trained weights usually have a clear gap at small k.

SVD: ``method="exact"`` (default) uses ``torch.linalg.svd`` (LAPACK gesdd, float32, thin); ``method="lowrank"``
uses ``torch.svd_lowrank`` (randomised range finder with ``k + 10`` columns and 4 power iterations, seeded).
Measured for SmolLM2-135M shapes (30 layers x 7 matrices: 576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536
down) on a shared 2-core CPU with ``torch.set_num_threads(1)``: exact 0.62 s per layer of random matrices
(~19 s per model); ``drift_summary`` on the real SmolLM2 weights took 46 s for the first checkpoint (base and
checkpoint decomposed) and 20 s for each further one (base factors cached via ``base_cache``); lowrank took
0.07 s per layer, 6.4 s / 3.9 s for the whole summary, and agreed with exact to ~1e-4 on the fractions
(and within 0.02 degrees on the mean largest angles) for a small random perturbation of the real weights.
With 2 OpenMP threads on the same CPU while other processes were busy, the exact SVDs were up to 50x slower
(thread oversubscription), so use one thread on small shared machines.

Response-space drift
    next_token_kl = mean over all non-pad positions of KL(p_model || p_base) of the next-token distributions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ATTN_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
SPECTRAL_MODULES: tuple[str, ...] = ATTN_MODULES + MLP_MODULES
SVD_METHODS: tuple[str, ...] = ("exact", "lowrank")
LOWRANK_OVERSAMPLE = 10
LOWRANK_NITER = 4

SvdMethod = Literal["exact", "lowrank"]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ------------------------------------------------------------------------------------------ names
def layer_index(name: str) -> int | None:
    """The decoder layer of a parameter (``model.layers.{i}.`` in its name), or ``None`` outside the layers."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """The kind of module a parameter belongs to: ``q_proj`` ... ``down_proj``, ``embed``, ``norm``, ``lm_head``.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``; ``model.embed_tokens.weight`` -> ``embed``;
    ``model.layers.3.input_layernorm.weight`` and ``model.norm.weight`` -> ``norm``; otherwise the name of the
    module holding the parameter (``lm_head`` ...).
    """
    parts = name.split(".")
    owner = parts[-2] if len(parts) >= 2 else parts[0]
    if "embed" in owner:
        return "embed"
    if "norm" in owner:
        return "norm"
    return owner


def module_group(mtype: str) -> str | None:
    """``attn`` for q/k/v/o projections, ``mlp`` for gate/up/down, else ``None``."""
    if mtype in ATTN_MODULES:
        return "attn"
    if mtype in MLP_MODULES:
        return "mlp"
    return None


def _layer_key(i: int) -> str:
    return f"layer_{i:02d}"


# ------------------------------------------------------------------------------------------ pairing
def paired_parameters(
    base_state: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, W_0, W_t)`` for every floating-point tensor of the two state dicts, in ``base_state`` order.

    Both dicts must hold the same floating-point names with the same shapes (integer buffers are ignored);
    a tensor that shares storage with an earlier one of ``base_state`` (tied ``lm_head``/embedding) is counted
    once. Raises ``ValueError`` naming the differing keys or shapes.
    """
    base_f = {k: v for k, v in base_state.items() if torch.is_tensor(v) and v.is_floating_point()}
    new_f = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    only_base, only_new = sorted(set(base_f) - set(new_f)), sorted(set(new_f) - set(base_f))
    if only_base or only_new:
        raise ValueError(
            "state dicts hold different parameters: only in base "
            f"{only_base[:5]}{' ...' if len(only_base) > 5 else ''}, only in checkpoint "
            f"{only_new[:5]}{' ...' if len(only_new) > 5 else ''} (are they the same architecture?)"
        )
    if not base_f:
        raise ValueError("state dicts hold no floating-point tensors")
    out: list[tuple[str, Tensor, Tensor]] = []
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, w0 in base_f.items():
        wt = new_f[name]
        if w0.shape != wt.shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(w0.shape)} in base and {tuple(wt.shape)} later"
            )
        ident = (w0.untyped_storage().data_ptr(), w0.storage_offset(), tuple(w0.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out.append((name, w0, wt))
    return out


def drift_shares(state: Mapping[str, Tensor], world_size: int,
                 modules: tuple[str, ...] = SPECTRAL_MODULES) -> list[list[str]]:
    """The parameters each of ``world_size`` ranks analyses: the names of :func:`paired_parameters` (a tied
    weight once, under its first name), dealt out by cost (:func:`opr.distributed.share_batches`: most costly
    first, to the least loaded rank), each share in ``state`` order. A spectral matrix (m x n, module type in
    ``modules``) costs m·n·min(m, n), an SVD's work; any other tensor its size. Deterministic, so every rank
    computes the same split.

    >>> import torch
    >>> drift_shares({"a.q_proj.weight": torch.ones(4, 4), "a.norm.weight": torch.ones(4),
    ...               "b.q_proj.weight": torch.ones(4, 4)}, 2)
    [['a.q_proj.weight', 'a.norm.weight'], ['b.q_proj.weight']]
    """
    from opr.distributed import share_batches

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    names, costs = [], []
    for name, w, _ in paired_parameters(state, state):
        names.append(name)
        spectral = w.dim() == 2 and module_type(name) in modules
        costs.append(float(w.shape[0] * w.shape[1] * min(w.shape)) if spectral else float(w.numel()))
    return [[names[i] for i in sorted(share)] for share in share_batches(costs, world_size)]


# ------------------------------------------------------------------------------------------ parameter drift
def parameter_terms(base_state: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> list[dict]:
    """The parameter drift's terms, one per parameter of :func:`paired_parameters` (in its order):
    ``{"name", "base_sq": ||W_0||_F^2, "diff_sq": ||W_t - W_0||_F^2}``. :func:`summarize_parameters` pools them;
    terms computed in parts (each rank its share of the parameters) pool to the same numbers when put back in
    this order."""
    out = []
    for name, w0, wt in paired_parameters(base_state, state):
        w0f = w0.detach().float()
        b = float(torch.linalg.vector_norm(w0f)) ** 2
        d = float(torch.linalg.vector_norm(wt.detach().to(w0f.device).float() - w0f)) ** 2
        out.append({"name": name, "base_sq": b, "diff_sq": d})
    return out


def summarize_parameters(terms: Iterable[Mapping]) -> dict[str, float]:
    """Pool :func:`parameter_terms` per module type, per layer, per ``attn``/``mlp`` group and overall:
    ``{"param/rel_fro/{group}": sqrt(Σ diff_sq / Σ base_sq)}`` (sums in the terms' order); a group whose base
    norm is zero (all-zero parameters) is left out, as its relative drift is undefined."""
    base_sq: dict[str, float] = {}
    diff_sq: dict[str, float] = {}
    for term in terms:
        mtype = module_type(term["name"])
        keys = [mtype, "all"]
        group = module_group(mtype)
        if group:
            keys.append(group)
        layer = layer_index(term["name"])
        if layer is not None:
            keys.append(_layer_key(layer))
        for key in keys:
            base_sq[key] = base_sq.get(key, 0.0) + term["base_sq"]
            diff_sq[key] = diff_sq.get(key, 0.0) + term["diff_sq"]
    return {
        f"param/rel_fro/{k}": math.sqrt(diff_sq[k] / base_sq[k])
        for k in _sorted_keys(base_sq)
        if base_sq[k] > 0
    }


def parameter_drift(base_state: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, float]:
    """Pooled relative Frobenius drift per module type, per layer, per ``attn``/``mlp`` group and overall.

    base_state, state: name -> tensor of any shape (same names and shapes in both).
    Returns ``{"param/rel_fro/{q_proj|...|embed|norm|attn|mlp|layer_00|...|all}": float}``; a group whose base
    norm is zero (all-zero parameters) is left out, as its relative drift is undefined.
    """
    return summarize_parameters(parameter_terms(base_state, state))


def _sorted_keys(keys: Iterable[str]) -> list[str]:
    """Module types first (alphabetical), then groups, layers in numeric order, ``all`` last."""

    def rank(k: str) -> tuple[int, int, str]:
        if k == "all":
            return (3, 0, k)
        if k in ("attn", "mlp"):
            return (1, 0, k)
        if k.startswith("layer_"):
            return (2, int(k[6:]), k)
        return (0, 0, k)

    return sorted(keys, key=rank)


# ------------------------------------------------------------------------------------------ spectral
@dataclass(frozen=True)
class TopK:
    """The top-k singular triplets of a matrix W (m x n): ``U`` (m, k), ``S`` (k,) descending, ``V`` (n, k)."""

    U: Tensor
    S: Tensor
    V: Tensor


def top_k_svd(W: Tensor, k: int, method: SvdMethod = "exact", seed: int = 0) -> TopK:
    """Top-k singular triplets of W (m x n), computed in float32; k is capped at min(m, n).

    ``exact``: thin ``torch.linalg.svd``. ``lowrank``: ``torch.svd_lowrank`` with q = k + 10 and 4 power
    iterations, its random test matrix drawn from a generator seeded with ``seed`` (the global RNG is untouched).
    """
    if W.dim() != 2:
        raise ValueError(f"top_k_svd needs a 2-D matrix, got shape {tuple(W.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; allowed: {', '.join(SVD_METHODS)}")
    W = W.detach().float()
    k = min(k, *W.shape)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return TopK(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous())
    q = min(k + LOWRANK_OVERSAMPLE, *W.shape)
    devices = [W.device] if W.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=q, niter=LOWRANK_NITER)
    return TopK(U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].contiguous())


def principal_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles in degrees, ascending, between span(A) and span(B).

    A, B: (m, k) with orthonormal columns (same k). Returns (k,) float64. The cosines are the singular values of
    A^T B and the sines those of B - A A^T B; each angle is atan2(sin, cos), accurate for small angles too
    (arccos alone loses them to rounding).
    """
    if A.dim() != 2 or A.shape != B.shape:
        raise ValueError(
            f"principal_angles needs two (m, k) bases of the same shape, got {tuple(A.shape)} "
            f"and {tuple(B.shape)}"
        )
    A64, B64 = A.detach().double(), B.to(A.device).detach().double()
    C = A64.T @ B64
    cos = torch.linalg.svdvals(C).clamp(0.0, 1.0)  # descending -> angles ascending
    sin = torch.linalg.svdvals(B64 - A64 @ C).clamp(0.0, 1.0).flip(0)  # ascending -> angles ascending
    return torch.rad2deg(torch.atan2(sin, cos))


def spectral_drift_matrix(
    W0: Tensor, Wt: Tensor, k: int = 16, method: SvdMethod = "exact", base: TopK | None = None
) -> dict[str, float]:
    """Spectral drift of one weight matrix (definitions in the module docstring).

    W0, Wt: (m, n). ``base`` may carry W0's precomputed ``top_k_svd`` (same k and method) to avoid recomputing it.
    Returns sv_rel_change, top_sv_rel_change, cos2_left, angle_left_deg, cos2_right, angle_right_deg and, for
    pooling, update_sq = ||dW||_F^2, inside_sq, cross_sq, outside_sq (the fractions' numerators), plus the
    fractions themselves when dW != 0.
    """
    if W0.dim() != 2 or W0.shape != Wt.shape:
        raise ValueError(
            f"spectral drift needs two 2-D matrices of one shape, got {tuple(W0.shape)} and {tuple(Wt.shape)}"
        )
    W0 = W0.detach().float()
    Wt = Wt.detach().to(W0.device).float()
    b = base if base is not None else top_k_svd(W0, k, method)
    t = top_k_svd(Wt, k, method)
    if b.S.shape != t.S.shape:
        raise ValueError(f"cached base factors have k={b.S.numel()}, this call needs k={t.S.numel()}")
    s0, s1 = b.S.double(), t.S.double()
    ang_l, ang_r = principal_angles(b.U, t.U), principal_angles(b.V, t.V)
    out = {
        "sv_rel_change": float(
            torch.linalg.vector_norm(s1 - s0) / torch.linalg.vector_norm(s0).clamp_min(1e-30)
        ),
        "top_sv_rel_change": float((s1[0] - s0[0]) / s0[0].clamp_min(1e-30)),
        "cos2_left": float(torch.cos(torch.deg2rad(ang_l)).pow(2).mean()),
        "angle_left_deg": float(ang_l.max()),
        "cos2_right": float(torch.cos(torch.deg2rad(ang_r)).pow(2).mean()),
        "angle_right_deg": float(ang_r.max()),
    }
    dW = Wt - W0
    left = b.U.T @ dW  # (k, n): coordinates of P_U dW
    right = dW @ b.V  # (m, k): coordinates of dW P_V
    total = float(dW.double().pow(2).sum())
    left_sq = float(left.double().pow(2).sum())  # ||P_U dW||^2
    right_sq = float(right.double().pow(2).sum())  # ||dW P_V||^2
    inside = float((left @ b.V).double().pow(2).sum())  # ||P_U dW P_V||^2
    cross = max(left_sq + right_sq - 2.0 * inside, 0.0)
    outside = max(total - left_sq - right_sq + inside, 0.0)
    out.update(update_sq=total, inside_sq=inside, cross_sq=cross, outside_sq=outside)
    if total > 0:
        out.update(
            inside_fraction=inside / total, cross_fraction=cross / total, outside_fraction=outside / total
        )
    return out


def spectral_drift(
    base_state: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    k: int = 16,
    method: SvdMethod = "exact",
    modules: tuple[str, ...] = SPECTRAL_MODULES,
    base_cache: dict | None = None,
) -> list[dict]:
    """Per-matrix spectral drift of every 2-D weight whose module type is in ``modules``.

    Returns one record per matrix: ``{"name", "module", "layer", "shape", **spectral_drift_matrix(...)}``.
    ``base_cache``: a dict reused across calls with the same ``base_state`` (one analysis of many checkpoints);
    the base's top-k factors are stored in it, keyed by (name, k, method).
    """
    records = []
    for name, w0, wt in paired_parameters(base_state, state):
        mtype = module_type(name)
        if w0.dim() != 2 or mtype not in modules:
            continue
        key = (name, k, method)
        base = base_cache.get(key) if base_cache is not None else None
        if base is None:
            base = top_k_svd(w0, k, method)
            if base_cache is not None:
                base_cache[key] = base
        rec = spectral_drift_matrix(w0, wt, k, method, base=base)
        records.append(
            {"name": name, "module": mtype, "layer": layer_index(name), "shape": list(w0.shape), **rec}
        )
    return records


_MEAN_KEYS = (
    "sv_rel_change",
    "top_sv_rel_change",
    "cos2_left",
    "angle_left_deg",
    "cos2_right",
    "angle_right_deg",
)
_FRACTIONS = ("inside", "cross", "outside")


def summarize_spectral(records: list[dict]) -> dict[str, float]:
    """Aggregate ``spectral_drift`` records per module type, per ``attn``/``mlp`` group and overall (``all``).

    Returns ``{"spectral/{metric}/{group}": float}``: means over matrices for the _MEAN_KEYS, energy-pooled
    inside/cross/outside fractions (left out for groups whose update is exactly zero).
    """
    groups: dict[str, list[dict]] = {}
    for rec in records:
        keys = [rec["module"], "all"]
        g = module_group(rec["module"])
        if g:
            keys.append(g)
        for key in keys:
            groups.setdefault(key, []).append(rec)
    out: dict[str, float] = {}
    for key in _sorted_keys(groups):
        recs = groups[key]
        for metric in _MEAN_KEYS:
            out[f"spectral/{metric}/{key}"] = sum(r[metric] for r in recs) / len(recs)
        total = sum(r["update_sq"] for r in recs)
        if total > 0:
            for frac in _FRACTIONS:
                out[f"spectral/{frac}_fraction/{key}"] = sum(r[f"{frac}_sq"] for r in recs) / total
    return out


def drift_terms(
    base_state: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    k: int = 16,
    method: SvdMethod = "exact",
    base_cache: dict | None = None,
) -> dict[str, list[dict]]:
    """The drift's per-parameter parts: ``{"parameters": parameter_terms(...), "spectral": spectral_drift(...)}``.
    :func:`summarize_drift` turns them, or the parts of several calls over disjoint parameters put back in
    :func:`paired_parameters` order, into :func:`drift_summary`'s numbers."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return {"parameters": parameter_terms(base_state, state),
            "spectral": spectral_drift(base_state, state, k=k, method=method, base_cache=base_cache)}


def summarize_drift(terms: Mapping[str, list[dict]], k: int) -> dict[str, float]:
    """:func:`drift_summary` from :func:`drift_terms` (``k``: the k the spectral records used)."""
    out: dict[str, float] = dict(summarize_parameters(terms["parameters"]))
    if terms["spectral"]:
        out.update(summarize_spectral(terms["spectral"]))
        out["spectral/k"] = float(k)
    return out


def drift_summary(
    base_state: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    k: int = 16,
    method: SvdMethod = "exact",
    base_cache: dict | None = None,
) -> dict[str, float]:
    """Flat, JSON-serialisable drift summary of ``state`` against ``base_state`` (module docstring has the
    definitions): ``param/rel_fro/*`` (``parameter_drift``), ``spectral/*`` (``summarize_spectral``) and
    ``spectral/k`` (the k used, capped by the smallest matrix dimension only per matrix).

    Suitable for ``results.json["stages"][t]["drift"]``. ``base_cache`` as in ``spectral_drift``.
    """
    return summarize_drift(drift_terms(base_state, state, k=k, method=method, base_cache=base_cache), k)


# ------------------------------------------------------------------------------------------ response drift
def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def _next_token_logprobs(model: torch.nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """log p(next token | prefix) at every position: ids, mask (b, L) -> (b, L, V) float32.

    Position ids count real tokens only, so left padding does not shift the positions a sequence sees.
    """
    dev = _device_of(model)
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def next_token_kl(
    base_model: torch.nn.Module,
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    batch_size: int = 4,
) -> float:
    """Mean KL(p_model || p_base) of the next-token distributions over all non-pad positions.

    KL(p_model || p_base) = Σ_v p_model(v) (log p_model(v) - log p_base(v)) at each position, i.e. how surprised
    the base would be by the trained model's predictions; averaged over every position whose
    ``attention_mask`` is 1 (token-weighted over the whole batch, not per sequence first).

    input_ids: (B, L) long; attention_mask: (B, L) 1 for tokens, 0 for padding (either side), default all 1.
    Both models must share the vocabulary. Runs in eval mode under no_grad, ``batch_size`` sequences at a time
    (memory ~ 3 x batch_size x L x V floats); the models' train/eval flags are restored afterwards.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not bool(attention_mask.bool().any()):
        raise ValueError("attention_mask has no non-pad position; KL is undefined")
    flags = (base_model.training, model.training)
    base_model.eval()
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            lp = _next_token_logprobs(model, ids, mask)
            lb = _next_token_logprobs(base_model, ids, mask).to(lp.device)
            if lp.shape[-1] != lb.shape[-1]:
                raise ValueError(f"vocabulary sizes differ: model {lp.shape[-1]}, base {lb.shape[-1]}")
            kl = (lp.exp() * (lp - lb)).sum(-1)  # (b, L)
            keep = mask.to(kl.device).bool()
            # where(), not multiplication: fully masked pad rows may hold NaN logits.
            total += torch.where(keep, kl, torch.zeros_like(kl)).sum().double().cpu()
            count += int(keep.sum())
    finally:
        base_model.train(flags[0])
        model.train(flags[1])
    return float(total) / count
