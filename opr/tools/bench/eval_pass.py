"""What one row of evaluation costs, one generation pass per task against one pass over all tasks, and what
the remaining evaluation levers would save.

Run (SmolLM2-135M on CPU; a few minutes per model)::

    python -m opr.tools.bench.eval_pass --threads 1 --out eval_pass.json
    python -m opr.tools.bench.eval_pass --model runs/x/checkpoints/stage1_sft --repeats 2   # a trained model too

Both variants evaluate the default run's row (``mini_trace``'s 3 tasks x 100 eval prompts and the 50 general
prompts, greedy, batch 32, each task's own token limit) on the same model:

- ``per_task``: the evaluation before the one-pass change: each task formatted, tokenised and generated alone
  (:func:`opr.generation.generate` with the task's ``max_new_tokens``): a task of 100 prompts leaves a batch
  of 4;
- ``one_pass``: :func:`opr.evaluation.generate_answers`, one length-sorted pass over all 350 prompts with
  per-prompt limits, the prompts encoded once (the loop reuses them at every row; the encoding is timed
  apart).

The variants run in ABBA order (``--repeats`` times) so that a change of machine load hits both. The table
gives seconds, the batches' decode steps, and how many answers are identical between the variants (batching
changes float rounding, which could flip a near-tie; the loop's matrix needs all of them identical).

Two levers are measured without being applied, on ``per_task``'s answers: a stop at the first newline (how
many generated tokens come after it, and how many scores would change if the answer were cut there: the
rewards read the whole answer) and the token limits (how many answers stop at their task's limit, against
the longest gold answer in tokens).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from opr.backbones import Backbone, load_pretrained, load_smollm2_135m
from opr.benchmarks.mini_trace import load_mini_trace
from opr.evaluation import EvalSettings, encode_eval_prompts, generate_answers
from opr.generation import SamplingConfig, generate, length_sorted_batches
from opr.tools.bench.common import machine_info, table, write_json
from opr.types import Task


def per_task_answers(backbone: Backbone, tasks: Sequence[Task], batch_size: int) -> list[list]:
    """Each task's greedy answers from its own generation pass (the evaluation before the one-pass change)."""
    out = []
    for task in tasks:
        prompts = [backbone.format_prompt(e.prompt, task.chat) for e in task.eval]
        sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, batch_size=batch_size)
        out.append([g[0] for g in generate(backbone, prompts, sampling, desc=False)])
    return out


def decode_steps(lengths: Sequence[int], generated: Sequence[int], batch_size: int,
                 limits: Sequence[int] | None = None) -> int:
    """Decode steps the batches of :func:`opr.generation.length_sorted_batches` take: each batch runs until
    its longest answer ends (its token count, + 1 for the EOS step, capped by the limit: ``generated`` already
    holds that)."""
    return sum(max(generated[i] for i in batch) for batch in length_sorted_batches(lengths, batch_size, limits))


def newline_cut(task: Task, gens: Sequence, examples: Sequence, tokenizer) -> dict:
    """What a stop at the first newline would do to one task's answers."""
    after, changed, with_newline = 0, 0, 0
    for g, ex in zip(gens, examples):
        if "\n" not in g.text.strip("\n") and not g.text.startswith("\n"):
            continue
        with_newline += 1
        pieces = [tokenizer.decode([t]) for t in g.token_ids]
        first = next((k for k, p in enumerate(pieces) if "\n" in p), len(pieces))
        after += len(pieces) - first - 1
        cut = g.text.split("\n", 1)[0] if not g.text.startswith("\n") else ""
        changed += task.reward(cut, ex) != task.reward(g.text, ex)
    return {"answers_with_newline": with_newline, "tokens_after_newline": after, "scores_changed": changed}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[],
                    help="a saved model folder (a stage checkpoint); repeat for more; the base SmolLM2 always runs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="ABBA rounds per model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = load_mini_trace()
    tasks = list(bench.tasks) + list(bench.general)
    settings = EvalSettings(batch_size=args.batch_size)
    models = [("base", None)] + [(m, m) for m in args.model]
    rows, details = [], []
    for name, folder in models:
        backbone = load_smollm2_135m() if folder is None else load_pretrained(name, folder, system_prompt="")
        clock = time.perf_counter()
        prompts = encode_eval_prompts(backbone, tasks, settings)
        encode_s = time.perf_counter() - clock
        seconds = {"per_task": [], "one_pass": []}
        answers = {}
        for _ in range(args.repeats):
            for variant in ("per_task", "one_pass", "one_pass", "per_task"):
                clock = time.perf_counter()
                if variant == "per_task":
                    gens = per_task_answers(backbone, tasks, args.batch_size)
                    answers[variant] = [[g.text for g in task_gens] for task_gens in gens]
                else:
                    answers[variant] = generate_answers(backbone, tasks, settings, prompts=prompts)[1]
                seconds[variant].append(time.perf_counter() - clock)
        lengths = [[len(ids) for ids in encoded] for encoded in prompts.encoded]
        generated = [[min(g.num_tokens + 1, t.max_new_tokens) for g in task_gens] for t, task_gens in zip(tasks, gens)]
        steps_per_task = sum(decode_steps(n, m, args.batch_size) for n, m in zip(lengths, generated))
        steps_one = decode_steps([x for n in lengths for x in n], [x for m in generated for x in m], args.batch_size,
                                 [t.max_new_tokens for t, n in zip(tasks, lengths) for _ in n])
        same = sum(a == b for pa, pb in zip(answers["per_task"], answers["one_pass"]) for a, b in zip(pa, pb))
        total = sum(len(p) for p in answers["per_task"])
        mean = {k: sum(v) / len(v) for k, v in seconds.items()}
        rows.append({"model": name, "per_task_s": mean["per_task"], "one_pass_s": mean["one_pass"],
                     "ratio": mean["per_task"] / mean["one_pass"], "encode_s": encode_s,
                     "new_tokens": sum(g.num_tokens for task_gens in gens for g in task_gens),
                     "steps_per_task": steps_per_task, "steps_one_pass": steps_one, "same_answers": f"{same}/{total}"})
        for task, task_gens in zip(tasks, gens):
            gold = max(len(backbone.tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in task.train + task.eval)
            details.append({"model": name, "task": task.name, "limit": task.max_new_tokens, "longest_gold": gold,
                            "at_limit": sum(g.num_tokens >= task.max_new_tokens for g in task_gens),
                            **newline_cut(task, task_gens, task.eval, backbone.tokenizer)})
    print(table(rows))
    print()
    print(table(details))
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "rows": rows, "levers": details,
                          "seconds": seconds})


if __name__ == "__main__":
    main()
