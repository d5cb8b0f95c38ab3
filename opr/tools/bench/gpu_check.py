"""The one table of ``launch/gpu_check.sh``: what its five steps measured, read from their output folder.

    python -m opr.tools.bench.gpu_check OUT_DIR [--out summary.json]

Rows: the SFT benchmark's variants (supervised tokens/s, s/step, peak memory; the bf16-vs-fp32 loss check),
the rollout benchmark's variants (generated tokens/s against ``model.generate``), the loop's DeepSpeed
ZeRO-3 stage (status, seconds of training and evaluation, the stage's last loss), the packed-attention path the
device selects (its forward + backward time against plain sdpa with the block mask, its largest difference from
the per-sequence loop), and the same stage with
``rollout.backend=vllm`` (status, seconds, how many vLLM engines its log says were built: one is right). A step
that failed or did not run shows as ``missing`` with the log to read; the vLLM step, skipped where vllm is not
installed, shows as ``skipped`` with the reason.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from opr.tools.bench.common import table, write_json


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rows(out: Path) -> list[dict]:
    found: list[dict] = []
    sft = _load(out / "sft.json")
    if sft is None:
        found.append({"step": "sft", "what": "missing (see sft.log)"})
    else:
        dtype = sft["settings"]["dtype"]
        for r in sft["summary"]:
            found.append({"step": "sft", "what": f"{r['variant']} ({dtype})", "tokens_per_s": r["tokens_per_s"],
                          "s_per_step": r["s_per_step"], "note": f"peak RSS {r['peak_rss_mb']:.0f} MB"})
        for name in ("loss_check", "precision_check"):
            check = sft.get(name) or {}
            if check:
                found.append({"step": "sft", "what": name, "note": f"{' vs '.join(check['variants'])}: max |Δloss| "
                              f"{check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.0e})"})
        for variant, err in (sft.get("failed") or {}).items():
            found.append({"step": "sft", "what": f"{variant} FAILED", "note": str(err)[:80]})
    roll = _load(out / "rollout.json")
    if roll is None:
        found.append({"step": "rollout", "what": "missing (see rollout.log)"})
    else:
        dtype = roll["settings"].get("dtype")
        for r in roll["results"]:
            found.append({"step": "rollout", "what": f"{r['variant']} ({dtype})", "tokens_per_s": r["tokens_per_s"],
                          "note": f"{r['generated_tokens']} tokens in {r['seconds']:.2f} s"})
    ds = _load(out / "ds_stage" / "results.json")
    if ds is None:
        found.append({"step": "deepspeed", "what": "missing (see ds_stage.log)"})
    else:
        row = _stage_row("deepspeed", ds)
        row["note"] += _memory_note(out, ds["stages"][-1] if len(ds["stages"]) > 1 else {})
        found.append(row)
    att = _load(out / "attention.json")
    if att is None:
        found.append({"step": "attention", "what": "missing (see attention.log)"})
    else:
        chosen = att["results"][att["selected"]]
        plain = att["results"].get("sdpa_block_mask")
        ratio = f", {chosen['ms'] / plain['ms']:.2f}x the time of sdpa with the block mask" if plain else ""
        found.append({"step": "attention", "what": f"{att['selected']} ({att['device']}, {att['dtype']})",
                      "note": f"{chosen['ms']:.1f} ms fwd+bwd{ratio}, max |diff| vs the loop "
                              f"{chosen['max_abs_diff_vs_loop']:.1e}"})
    skipped = out / "vllm_stage.skipped"
    vllm = _load(out / "vllm_stage" / "results.json")
    if skipped.is_file():
        found.append({"step": "vllm", "what": "skipped", "note": skipped.read_text().strip()})
    elif vllm is None:
        found.append({"step": "vllm", "what": "missing (see vllm_stage.log)"})
    else:
        row = _stage_row("vllm", vllm)
        row["what"] += ", rollout.backend=vllm"
        row["note"] += f", vLLM engines built: {_engine_builds(out / 'vllm_stage.log')}"
        found.append(row)
    return found


def _stage_row(step: str, results: dict) -> dict:
    """A loop run's first stage as a table row: ZeRO stage, ranks, dtype, training tokens/s and s/step, status,
    seconds of training and evaluation, last loss."""
    stage = results["stages"][-1] if len(results["stages"]) > 1 else {}
    sec = stage.get("seconds", {})
    run = results.get("run", {})
    return {"step": step, "what": f"ZeRO-{results['config']['engine'].get('zero_stage')} stage 1, "
            f"{run.get('world_size')} rank(s), {run.get('compute_dtype')}",
            "tokens_per_s": (stage.get("train") or {}).get("tokens_per_second"),
            "s_per_step": (sec.get("train", 0) / stage["train"]["steps"]) if stage.get("train") else None,
            "note": f"status {results['status']}, train {sec.get('train', 0):.1f} s, eval {sec.get('eval', 0):.1f} s, "
                    f"last loss {(stage.get('train') or {}).get('last_loss')}"}


def _engine_builds(log: Path) -> str:
    """How many times the run's log says a vLLM engine was built (``opr.generation_vllm``), or ``n/a``."""
    try:
        return str(log.read_text(errors="replace").count("vLLM engine built beside the trainer"))
    except OSError:
        return "n/a"


def _memory_note(out: Path, stage: dict) -> str:
    """The stage's measured GPU peak beside the memory plan's peak (``plan.txt``), where both exist."""
    measured = stage.get("peak_gpu_mb")
    planned = None
    if (out / "plan.txt").is_file():
        for line in (out / "plan.txt").read_text().splitlines():
            if line.startswith("peak per GPU: "):
                planned = float(line.split()[3])
    if measured is None and planned is None:
        return ""
    show = lambda v, unit: "n/a" if v is None else f"{v:.2f} {unit}"  # noqa: E731
    return f", GPU peak {show(None if measured is None else measured * 2**20 / 1e9, 'GB')} (plan {show(planned, 'GB')})"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--out", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    found = rows(args.out_dir)
    machine = (_load(args.out_dir / "sft.json") or _load(args.out_dir / "rollout.json") or {}).get("machine", {})
    print(f"machine: {machine}")
    print(table(found, ["step", "what", "tokens_per_s", "s_per_step", "note"]))
    write_json(args.out, {"machine": machine, "rows": found})
    return found


if __name__ == "__main__":
    main()
