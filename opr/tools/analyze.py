"""Drift of trained checkpoints from their base model (definitions in ``opr.analysis.drift``).

    python -m opr.tools.analyze BASE_DIR CKPT_DIR [CKPT_DIR ...] [--k 16] [--method exact|lowrank]
                          [--out drift.json] [--prompts FILE] [--max-prompts 64] [--max-length 256]

BASE_DIR and each CKPT_DIR are Hugging Face model folders (``model.safetensors`` or its shards are read with
``safetensors.torch.load_file``; other folders go through ``AutoModelForCausalLM.from_pretrained``). A CKPT_DIR
that is a run's ``checkpoints/`` folder (``stage{t}/`` inside, see ``opr.checkpoint``) stands for all its
complete stages in order. ``--prompts`` (JSONL, one ``{"prompt": ...}`` per line) adds the response-space drift
``response/next_token_kl`` = mean KL(p_checkpoint || p_base) over the prompts' tokens (tokenizer of BASE_DIR).

Without ``--out`` the full summaries are printed as JSON; with it they are written there and a short table of
the headline numbers is printed. A checkpoint inside a run (``<run>/checkpoints/stage{t}``) also gets the run's
scores after stage t from its ``results.json``: ``ood`` (the mean general-ability score, the held-out set no
stage trains on) and the per-task scores; the base gets row 0. ``--plot FILE`` draws, per checkpoint, the OOD
score against the mean principal angle of the top-k singular subspaces and against the relative change of the
top-k singular values ("RL heals OOD forgetting": OOD behaviour follows the rotation, not the values). With three
or more scored points (the base counts as one; give several runs' checkpoints/ folders to pool them) the output
gains ``ood_correlation``: Spearman's rho of the OOD score against each, with n and a permutation p-value.

    python -m opr.tools.analyze edit REFERENCE_DIR TARGET_DIR OUT_DIR [--top-k 100] [--tail-k 100]
                          [--vectors reference|target] [--values reference|target] [--modules q_proj,...]
                          [--layers REGEX] [--control]

writes TARGET_DIR with the top-k and tail-k singular components of its 2-D weights taken from REFERENCE_DIR
(vectors and values each from either side; ``opr.analysis.svd_edit`` says which edit the "RL heals OOD
forgetting" paper made) as a plain model folder, ready for ``python -m opr.tools.score`` or ``backbone.path``.
``--control`` writes the edit's control instead: every weight the edit would change, moved along its own
fine-tuning delta to the edited weight's distance from REFERENCE_DIR (``matched_interpolation``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from opr.analysis.drift import SVD_METHODS, SvdMethod, drift_summary, next_token_kl, spectral_drift
from opr.metrics.rank import spearman_test
from opr.results import RunResults

HEADLINE = (
    ("rel_fro", "param/rel_fro/all"),
    ("inside", "spectral/inside_fraction/all"),
    ("cross", "spectral/cross_fraction/all"),
    ("outside", "spectral/outside_fraction/all"),
    ("angleL", "spectral/angle_left_deg/all"),
    ("angleR", "spectral/angle_right_deg/all"),
    ("sv_rel", "spectral/sv_rel_change/all"),
    ("kl", "response/next_token_kl"),
)
ANGLE_KEYS = ("spectral/angle_left_deg/all", "spectral/angle_right_deg/all")
SV_KEY = "spectral/sv_rel_change/all"


def run_scores(ckpt: Path) -> dict | None:
    """The scores of the run that saved ``ckpt`` after it: ``{"stage", "ood" (mean over the general-ability
    sets, None without any), "tasks": {name: score}, "base": the same for row 0}``. ``<run>/checkpoints/stage{t}``
    reads row t of the matrices; a phase checkpoint ``stage{t}_{phase}`` (``sft_then_grpo``'s ``stage1_sft``)
    reads the curve point at that phase's end (``eval.every_steps``; only the sets the curve evaluated). None for
    a folder that is not a run's checkpoint, or a run without that row or point."""
    match = re.fullmatch(r"stage(\d+)(?:_(\w+))?", ckpt.name)
    results = ckpt.parent.parent / "results.json"
    if match is None or ckpt.parent.name != "checkpoints" or not results.is_file():
        return None
    record = RunResults.from_json(json.loads(results.read_text(encoding="utf-8")))
    t, phase = int(match.group(1)), match.group(2)
    if t >= len(record.matrix):
        return None
    general_names = list(record.general.tasks or [])

    def of(scores: dict) -> dict:
        general = [scores[g] for g in general_names if g in scores]
        return {"ood": sum(general) / len(general) if general else None,
                "tasks": {name: scores[name] for name in record.tasks if name in scores}}

    def row(i: int) -> dict:
        general = record.general.matrix[i] if general_names and i < len(record.general.matrix) else []
        return of(dict(zip(record.tasks, record.matrix[i])) | dict(zip(general_names, general)))

    if phase is None:
        return {"stage": t, **row(t), "base": row(0)}
    stage = next((e for e in record.stages if e.stage == t), None)
    points = [p for p in (stage.curve or []) if p.get("phase") == phase] if stage is not None else []
    if not points:
        return None
    return {"stage": f"{t}_{phase}", **of(points[-1]["scores"]), "base": row(0)}


def mean_angle(drift: dict) -> float:
    """Mean of the left and right principal angles (degrees) of the top-k singular subspaces, all matrices."""
    return sum(drift[k] for k in ANGLE_KEYS) / len(ANGLE_KEYS)


def _model_files(folder: Path) -> list[Path]:
    """The folder's model weight files: ``model.safetensors`` or ``model-XXXXX-of-YYYYY.safetensors`` shards."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(folder.glob("model-*-of-*.safetensors"))


def _drop_tied_head(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove ``lm_head.weight`` when it equals the input embedding (tied weights are saved once or twice
    depending on the writer; dropping the copy makes base and checkpoint comparable)."""
    head, emb = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is not None and emb is not None and head.shape == emb.shape and torch.equal(head, emb):
        state = dict(state)
        del state["lm_head.weight"]
    return state


def load_state_dict(folder: Path) -> dict[str, Tensor]:
    """Name -> tensor of a model folder (safetensors when present, else ``from_pretrained``), tied head dropped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (or is not a directory)")
    files = _model_files(folder)
    if files:
        from safetensors.torch import load_file

        state: dict[str, Tensor] = {}
        for f in files:
            part = load_file(str(f))
            dup = set(part) & set(state)
            if dup:
                raise ValueError(f"{f} repeats tensors of another shard: {sorted(dup)[:5]}")
            state.update(part)
        return _drop_tied_head(state)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{str(folder)!r} holds no model.safetensors (or shards) and from_pretrained failed: {err}"
        ) from err
    return _drop_tied_head({k: v.detach() for k, v in model.state_dict().items()})


def expand_checkpoints(paths: Sequence[Path]) -> list[Path]:
    """Each path itself, or, for a run's ``checkpoints/`` folder, its complete ``stage{t}`` folders in order, each
    after its phase checkpoints (``stage{t}_sft`` of ``sft_then_grpo``)."""
    from opr.checkpoint import complete_stages, stage_dir

    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint folder {str(p)!r} does not exist (or is not a directory)")
        stages = [] if (p / "config.json").exists() else complete_stages(p)
        if stages:
            for s in stages:
                out.extend(sorted(q for q in p.glob(f"stage{s}_*") if (q / "config.json").is_file()))
                out.append(stage_dir(p, s))
        else:
            out.append(p)
    return out


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """The ``prompt`` strings of a JSONL file (blank lines skipped), at most ``limit`` of them."""
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from err
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ValueError(
                    f"{path}:{n}: each line needs a non-empty string field 'prompt', got {line[:80]!r}"
                )
            prompts.append(row["prompt"])
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` (B, L) of the prompts, truncated to ``max_length`` tokens."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return enc["input_ids"], enc["attention_mask"]


def analyze(
    base_dir: Path,
    ckpt_dirs: Sequence[Path],
    k: int = 16,
    method: str = "exact",
    prompts: list[str] | None = None,
    max_length: int = 256,
    batch_size: int = 4,
    per_matrix: bool = False,
) -> dict:
    """Drift summaries of each checkpoint against the base: ``{"base", "k", "method", "checkpoints": [{"path",
    "seconds", "drift": {...}, ["per_matrix": [...]]}]}``. The base's SVD factors are computed once."""
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; allowed: {', '.join(SVD_METHODS)}")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    svd = cast(SvdMethod, method)
    base_state = load_state_dict(base_dir)
    cache: dict = {}
    ids = mask = base_model = None
    if prompts:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ids, mask = tokenize_prompts(AutoTokenizer.from_pretrained(str(base_dir)), prompts, max_length)
        base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    out: dict = {"base": str(base_dir), "k": k, "method": method, "checkpoints": []}
    for ckpt in expand_checkpoints(ckpt_dirs):
        t0 = time.perf_counter()
        state = load_state_dict(ckpt)
        entry: dict = {"path": str(ckpt)}
        scores = run_scores(ckpt)
        if scores is not None:
            entry["scores"] = {key: scores[key] for key in ("stage", "ood", "tasks")}
            out.setdefault("base_scores", scores["base"])
        entry["drift"] = drift_summary(base_state, state, k=k, method=svd, base_cache=cache)
        if per_matrix:
            entry["per_matrix"] = spectral_drift(base_state, state, k=k, method=svd, base_cache=cache)
        if base_model is not None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
            entry["drift"]["response/next_token_kl"] = next_token_kl(base_model, model, ids, mask, batch_size)
            del model
        entry["seconds"] = time.perf_counter() - t0
        out["checkpoints"].append(entry)
    return out


def headline_table(result: dict) -> str:
    """A plain-text table: one row per checkpoint, the overall (``/all``) drift numbers as columns."""
    rows = [["checkpoint"] + [h for h, _ in HEADLINE] + ["ood", "seconds"]]
    if result.get("base_scores", {}).get("ood") is not None:
        rows.append(["base"] + ["0"] * len(HEADLINE) + [f"{result['base_scores']['ood']:.1f}", "-"])
    for entry in result["checkpoints"]:
        d = entry["drift"]
        ood = entry.get("scores", {}).get("ood")
        rows.append(
            [entry["path"]]
            + [f"{d[key]:.4g}" if key in d else "-" for _, key in HEADLINE]
            + ["-" if ood is None else f"{ood:.1f}", f"{entry['seconds']:.1f}"]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _run_of(ckpt: Path) -> str:
    """The run a checkpoint belongs to: ``<run>`` of ``<run>/checkpoints/stage{t}``, else its folder."""
    return ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else str(ckpt.parent)


def ood_points(result: dict) -> list[tuple[str | None, str, float, float, float]]:
    """``(run, name, mean angle, singular-value change, OOD score)`` per checkpoint with an OOD score, in order;
    the base model first (run None, at zero rotation and change) when its score is known."""
    points = [(_run_of(Path(e["path"])), Path(e["path"]).name, mean_angle(e["drift"]), e["drift"][SV_KEY],
               e["scores"]["ood"]) for e in result["checkpoints"] if e.get("scores", {}).get("ood") is not None]
    base = result.get("base_scores", {}).get("ood")
    if points and base is not None:
        points.insert(0, (None, "base", 0.0, 0.0, base))
    return points


def ood_correlations(result: dict) -> dict | None:
    """Claim 4 of "RL heals OOD forgetting", as numbers: Spearman's rho (with n and a permutation p-value) of
    the OOD score against the mean rotation angle and against the singular-value change, over the points of
    :func:`ood_points`. None with fewer than 3 points."""
    points = ood_points(result)
    if len(points) < 3:
        return None
    ood = [p[4] for p in points]
    return {"rotation": spearman_test([p[2] for p in points], ood),
            "sv_change": spearman_test([p[3] for p in points], ood)}


def correlation_lines(corr: dict) -> list[str]:
    return [f"Spearman rho(OOD, {label}) = {c['rho']:+.2f} (n = {c['n']}, p = {c['p']:.3g}, {c['p_method']})"
            for label, c in (("mean rotation angle", corr["rotation"]), ("singular-value change", corr["sv_change"]))]


def plot_ood(result: dict, path: Path) -> int:
    """One point per checkpoint with an OOD score (and the base at 0), one line per run from the base through its
    checkpoints: OOD score against the mean principal angle (left panel) and against the relative singular-value
    change (right). Returns the points drawn (the base once)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = ood_points(result)
    if not points:
        return 0
    base = [p for p in points if p[0] is None]
    runs: dict[str, list] = {}  # one line per run (its checkpoints in order), from the base when known
    for point in points:
        if point[0] is not None:
            runs.setdefault(point[0], list(base)).append(point)
    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    for ax, index, label in ((fig.add_subplot(1, 2, 1), 2, "mean principal angle, top-k subspaces (deg)"),
                             (fig.add_subplot(1, 2, 2), 3, "relative change of the top-k singular values")):
        for run, line in runs.items():
            ax.plot([p[index] for p in line], [p[4] for p in line], "o-", label=run if len(runs) > 1 else None)
            for p in line:
                if p[0] is not None:
                    ax.annotate(p[1], (p[index], p[4]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for p in base:
            ax.annotate("base", (p[index], p[4]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if len(runs) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("OOD score (general set, 0-100)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"OOD score against rotation and singular values (k = {result['k']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return len(points)


def edit_main(argv: Sequence[str]) -> int:
    from opr.analysis.svd_edit import SOURCES, write_edited_model

    ap = argparse.ArgumentParser(prog="python -m opr.tools.analyze edit",
                                 description="Put singular components of a reference model back into a target.")
    ap.add_argument("reference", type=Path, help="model folder whose components are restored (e.g. the base)")
    ap.add_argument("target", type=Path, help="fine-tuned model folder to edit")
    ap.add_argument("out", type=Path, help="folder for the edited model")
    ap.add_argument("--top-k", type=int, default=100, help="largest components restored (default 100)")
    ap.add_argument("--tail-k", type=int, default=100, help="smallest components restored (default 100)")
    ap.add_argument("--vectors", choices=SOURCES, default="reference", help="singular vectors from (default reference)")
    ap.add_argument("--values", choices=SOURCES, default="reference", help="singular values from (default reference)")
    ap.add_argument("--modules", default=None, help="comma-separated module types (q_proj,...,down_proj,embed,"
                    "lm_head); default: every 2-D weight")
    ap.add_argument("--layers", default=None, help="regular expression a weight name must match")
    ap.add_argument("--control", action="store_true",
                    help="write the edit's control instead: each edited weight moved along its own fine-tuning "
                         "delta to the edit's distance from the reference (opr.analysis.svd_edit."
                         "matched_interpolation)")
    args = ap.parse_args(argv)
    if args.top_k < 0 or args.tail_k < 0:
        ap.error(f"--top-k and --tail-k must be >= 0, got {args.top_k}, {args.tail_k}")
    for folder in (args.reference, args.target):
        if not (folder / "config.json").is_file():
            print(f"error: {folder} is not a model folder (no config.json)", file=sys.stderr)
            return 2
    try:
        edited = write_edited_model(args.reference, args.target, args.out, top_k=args.top_k, tail_k=args.tail_k,
                                    vectors=args.vectors, values=args.values,
                                    modules=args.modules.split(",") if args.modules else None, layers=args.layers,
                                    control=args.control)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = "the distance-matched interpolation of an edit of" if args.control else "edited"
    print(f"{what} {len(edited)} weights (top {args.top_k} + tail {args.tail_k} components: vectors from "
          f"{args.vectors}, values from {args.values}); wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["edit"]:
        return edit_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m opr.tools.analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="base model folder")
    ap.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint folders (or a run's checkpoints/)")
    ap.add_argument("--k", type=int, default=16, help="top-k singular subspace size (default 16)")
    ap.add_argument("--method", choices=SVD_METHODS, default="exact", help="SVD: exact (default) or lowrank")
    ap.add_argument("--out", type=Path, default=None, help="write the summaries here as JSON")
    ap.add_argument(
        "--prompts", type=Path, default=None, help='JSONL of {"prompt": ...} for the next-token KL'
    )
    ap.add_argument("--max-prompts", type=int, default=64, help="use at most this many prompts (default 64)")
    ap.add_argument("--max-length", type=int, default=256, help="truncate prompts to this many tokens")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass for the KL")
    ap.add_argument("--per-matrix", action="store_true", help="also keep every matrix's spectral record")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the OOD score against the rotation angle "
                    "and the singular-value change (checkpoints of a run, whose results.json gives the scores)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: several OpenMP threads on a busy small machine make the "
        "SVDs far slower)",
    )
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.max_prompts < 1:
        ap.error(f"--max-prompts must be >= 1, got {args.max_prompts}")
    torch.set_num_threads(args.threads)
    try:
        prompts = read_prompts(args.prompts, args.max_prompts) if args.prompts else None
        result = analyze(
            args.base,
            args.checkpoints,
            k=args.k,
            method=args.method,
            prompts=prompts,
            max_length=args.max_length,
            batch_size=args.batch_size,
            per_matrix=args.per_matrix,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    corr = ood_correlations(result)
    if corr is not None:
        result["ood_correlation"] = corr
    if args.out is None:
        print(json.dumps(result, indent=1))
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(headline_table(result))
        if corr is not None:
            print("\n".join(correlation_lines(corr)))
        print(f"wrote {args.out}")
    if args.plot is not None:
        drawn = plot_ood(result, args.plot)
        if drawn == 0:
            print("error: --plot: no checkpoint has an OOD score (give a run's checkpoints/ folder whose "
                  "results.json has a general-ability row); nothing drawn", file=sys.stderr)
            return 2
        print(f"wrote {args.plot} ({drawn} points)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
