"""How much a self-distillation teacher knows: the gold answer's probability under each teacher context.

    python -m opr.analysis.teacher_signal [--backbone smollm2_135m|tiny] [--per-task 40] [--out signal.json]

For the first ``--per-task`` training examples of each default-stream task (``mini_trace``, the default
config's tasks), the model scores the example's gold answer y after three contexts:

- ``student``: the prompt alone (what the student sees);
- ``instruction``: ``self_distill``'s default ``teacher_template`` with the gold answer as the demonstration,
  in one user turn (``teacher_format: instruction``);
- ``assistant_turn``: user: prompt, assistant: gold answer, user: prompt (``teacher_format: assistant_turn``).

Per task and context: the mean probability of y's first token and the mean log-probability per token of y
(nats). A teacher whose context does not raise these over the student's carries no signal to distil: measure
this before a sweep (issue: on-policy baselines that learn).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from opr.backbones import Backbone
from opr.types import Example, Task

CONTEXTS = ("student", "instruction", "assistant_turn")
CONF = Path(__file__).resolve().parents[2] / "conf"


def context_text(backbone: Backbone, task: Task, example: Example, context: str, template: str) -> str:
    """The formatted text before the answer for one of :data:`CONTEXTS`."""
    if context == "student":
        return backbone.format_prompt(example.prompt, task.chat)
    if context == "instruction":
        return backbone.format_prompt(template.format(prompt=example.prompt, demonstration=example.answer), task.chat)
    if context == "assistant_turn":
        turns = [("user", example.prompt), ("assistant", example.answer), ("user", example.prompt)]
        return backbone.format_conversation(turns, task.chat)
    raise ValueError(f"unknown context {context!r}; allowed: {', '.join(CONTEXTS)}")


@torch.no_grad()
def answer_logprobs(backbone: Backbone, prefix: str, answer: str) -> torch.Tensor:
    """Log-probabilities [A] of the answer's tokens after ``prefix`` (teacher forcing, one sequence)."""
    tok = backbone.tokenizer
    p = tok(prefix, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a], device=next(backbone.model.parameters()).device)
    logits = backbone.model(input_ids=ids).logits[0, len(p) - 1 : -1].float()  # positions predicting a
    return logits.log_softmax(-1).gather(-1, ids[0, len(p):, None]).squeeze(-1)


def measure(backbone: Backbone, tasks: Sequence[Task], per_task: int, template: str) -> list[dict]:
    """One row per (task, context): n, mean first-token probability, mean per-token log-probability."""
    backbone.model.eval()
    rows = []
    for task in tasks:
        examples = task.train[:per_task]
        for context in CONTEXTS:
            first, mean_lp = [], []
            for ex in examples:
                lp = answer_logprobs(backbone, context_text(backbone, task, ex, context, template), ex.answer)
                first.append(float(lp[0].exp()))
                mean_lp.append(float(lp.mean()))
            rows.append({"task": task.name, "context": context, "n": len(examples),
                         "first_token_prob": sum(first) / len(first), "mean_logprob": sum(mean_lp) / len(mean_lp)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from opr.backbones import load_smollm2_135m, load_tiny
    from opr.benchmarks.mini_trace import load_mini_trace
    from opr.methods.self_distill import SelfDistill
    from opr.tools.bench.common import table, write_json

    ap = argparse.ArgumentParser(prog="python -m opr.analysis.teacher_signal", description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=["smollm2_135m", "tiny"], default="smollm2_135m")
    ap.add_argument("--per-task", type=int, default=40, help="training examples per task (default 40)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.per_task < 1:
        ap.error(f"--per-task must be >= 1, got {args.per_task}")
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_tiny() if args.backbone == "tiny" else load_smollm2_135m()
    # the default stream: the options of conf/benchmark/mini_trace.yaml (its tasks, sizes, answer style)
    options = OmegaConf.to_container(OmegaConf.load(CONF / "benchmark" / "mini_trace.yaml"))
    benchmark = load_mini_trace(**{k: v for k, v in options.items() if k not in ("_target_", "name")})
    rows = measure(backbone, benchmark.tasks, args.per_task, SelfDistill().teacher_template)
    print(table(rows, ["task", "context", "n", "first_token_prob", "mean_logprob"]))
    write_json(args.out, {"backbone": args.backbone, "per_task": args.per_task, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
