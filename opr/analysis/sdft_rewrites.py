"""How many of ``sdft``'s rewrites it keeps, per rewrite template and task.

    python -m opr.analysis.sdft_rewrites [--backbone smollm2_135m|tiny] [--per-task 40] [--template NAME ...]
        [--max-new-tokens N] [--threads 1] [--out rewrites.json]

For the first ``--per-task`` training examples of each default-stream task (``mini_trace``, the default
config's tasks) and each template of :data:`TEMPLATES` (or those named by ``--template``), the model rewrites
each gold answer as ``method=sdft`` does before a stage: the rewrite requests of :meth:`SDFT.rewrite_requests`,
greedy generation through the shared :func:`opr.rollout.sample_rollouts`, and SDFT's own keep rule
(:meth:`SDFT.judge`: non-empty, ended before the token limit, task reward >= ``min_reward``, 50 by default).
The token limit is the task's answer length unless ``--max-new-tokens`` sets one (as ``method.max_new_tokens``).

Per template and task: ``kept`` (the fraction SDFT would train instead of the gold answer), ``cut`` (the
fraction stopped at the token limit), ``mean_reward`` (0-100, over all rewrites), ``identical`` (the fraction
equal to the gold answer: a template that makes the model copy gold keeps much and changes nothing) and
``kept_new`` (kept and not identical: the rewrites that are the model's own) and ``lp_gain`` (over the kept
new rewrites: the mean log-probability per token of the rewrite after the *plain* task prompt, as SDFT trains
it, minus the gold answer's, in nats; > 0: the rewrite is closer than gold to what the model would say, the
premise of SDFT). Then a few rewrites per task.
A rewrite prompt the model cannot follow leaves SDFT as plain SFT on gold: measure this before a sweep
(issue 18: a rewrite prompt that a small instruct model can follow).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from opr.analysis.teacher_signal import answer_logprobs, default_stream
from opr.backbones import Backbone
from opr.methods.sdft import DEFAULT_REWRITE_TEMPLATE, SDFT
from opr.rollout import sample_rollouts
from opr.types import Task

# Candidate rewrite templates (str.format with {prompt} and {answer}, sent as one chat user turn).
TEMPLATES: dict[str, str] = {
    # sdft's default until this measurement: the request, the reference, then an instruction to restate it.
    "restate": (
        "{prompt}\n\nReference answer:\n{answer}\n\n"
        "Restate the reference answer in your own words. Keep its meaning and its final result, follow the "
        "format the request asks for, and reply with the restated answer only."
    ),
    # Yang et al. 2024 (SDFT), Fig. 3 / sail-sg/sdft: a preamble saying an instruction and a reference answer
    # follow and asking for the model's own response with the reference as a guide, then "###" sections for the
    # instruction and the reference, ending in a response header (paraphrased; the guide sentence is theirs).
    "yang2024": (
        "Below is an instruction describing a task, together with a reference answer. "
        "Using the reference answer as a guide, write your own response.\n"
        "### Instruction:\n{prompt}\n### Reference Answer:\n{answer}\n### Response:"
    ),
    # Ours, for a 135M model: the reference first, then the task's own request last, so the turn ends on the
    # task's answer cue ("Name exactly one of these words.", "end with the number") as a plain prompt does.
    "answer_first": "Reference answer: {answer}\n\n{prompt}",
    # Ours: the request, the answer, one short instruction to answer in that form.
    "same_form": DEFAULT_REWRITE_TEMPLATE,
}
COLUMNS = ["template", "task", "n", "limit", "kept", "cut", "mean_reward", "identical", "kept_new", "lp_gain"]


def measure(backbone: Backbone, tasks: Sequence[Task], per_task: int, templates: Mapping[str, str],
            max_new_tokens: Optional[int] = None, batch_size: int = 32, shown: int = 2) -> tuple[list[dict], list[dict]]:
    """One row per (template, task) with the fractions of :data:`COLUMNS` over the first ``per_task`` training
    examples, and the first ``shown`` rewrites of each (template, task)."""
    backbone.model.eval()
    rows, examples = [], []
    for name, template in templates.items():
        method = SDFT(template=template, max_new_tokens=max_new_tokens)
        for task in tasks:
            golds = list(task.train[:per_task])
            groups = sample_rollouts(backbone, method.rewrite_requests(golds), {task.name: task}, 1,
                                     method.temperature, method.top_p, batch_size, seed=0,
                                     max_new_tokens=method.max_new_tokens)
            kept = cut = identical = kept_new = 0
            rewards, gains = [], []
            for i, (ex, group) in enumerate(zip(golds, groups)):
                rollout = group[0]
                text, reward, keep = method.judge(rollout, task, ex)
                same = text == ex.answer.strip()
                kept += keep
                cut += not rollout.finished
                identical += same
                kept_new += keep and not same
                rewards.append(reward)
                if keep and not same:
                    prompt = backbone.format_prompt(ex.prompt, task.chat)
                    own = answer_logprobs(backbone, prompt, text).mean()
                    gains.append(float(own - answer_logprobs(backbone, prompt, ex.answer).mean()))
                if i < shown:
                    examples.append({"template": name, "task": task.name, "gold": ex.answer, "rewrite": text,
                                     "reward": reward, "finished": rollout.finished, "kept": keep})
            n = len(golds)
            rows.append({"template": name, "task": task.name, "n": n,
                         "limit": method.max_new_tokens or task.max_new_tokens,
                         "kept": kept / n, "cut": cut / n, "mean_reward": sum(rewards) / n,
                         "identical": identical / n, "kept_new": kept_new / n,
                         "lp_gain": sum(gains) / len(gains) if gains else None})
    return rows, examples


def main(argv: Sequence[str] | None = None) -> int:
    from opr.tools.bench.common import table, write_json

    ap = argparse.ArgumentParser(prog="python -m opr.analysis.sdft_rewrites", description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=["smollm2_135m", "tiny"], default="smollm2_135m")
    ap.add_argument("--per-task", type=int, default=40, help="training examples per task (default 40)")
    ap.add_argument("--template", action="append", choices=sorted(TEMPLATES),
                    help="a template of TEMPLATES to measure (repeatable; default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="token limit of a rewrite (default: the task's answer length, as method.max_new_tokens=null)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (rollout.batch_size)")
    ap.add_argument("--examples", type=int, default=2, help="rewrites shown per template and task (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", help="also write the rows and the shown rewrites as JSON")
    args = ap.parse_args(argv)
    if args.per_task < 1:
        ap.error(f"--per-task must be >= 1, got {args.per_task}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, tasks = default_stream(args.backbone)
    names = args.template or list(TEMPLATES)
    rows, shown = measure(backbone, tasks, args.per_task, {n: TEMPLATES[n] for n in names},
                          args.max_new_tokens, args.batch_size, args.examples)
    default = [n for n, t in TEMPLATES.items() if t == DEFAULT_REWRITE_TEMPLATE]
    print(f"sdft's default template: {default[0] if default else '(none of these)'}")
    print(table(rows, COLUMNS))
    for ex in shown:
        print(f"[{ex['template']}/{ex['task']}] gold={ex['gold']!r} rewrite={ex['rewrite']!r} "
              f"reward={ex['reward']:g} finished={ex['finished']} kept={ex['kept']}")
    write_json(args.out, {"backbone": args.backbone, "per_task": args.per_task,
                          "max_new_tokens": args.max_new_tokens, "rows": rows, "examples": shown})
    return 0


if __name__ == "__main__":
    sys.exit(main())
