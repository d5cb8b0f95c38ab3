"""How much a self-distillation teacher knows: the gold answer's probability under each teacher context.

    python -m opr.analysis.teacher_signal [--backbone smollm2_135m|tiny | --model DIR] [--per-task 40] [--out signal.json]

For the first ``--per-task`` training examples of each default-stream task (``mini_trace``, the default
config's tasks), the model scores the example's gold answer y after three contexts:

- ``student``: the prompt alone (what the student sees);
- ``instruction``: ``self_distill``'s default ``teacher_template`` with the gold answer as the demonstration,
  in one user turn (``teacher_format: instruction``);
- ``assistant_turn``: user: prompt, assistant: gold answer, user: prompt (``teacher_format: assistant_turn``);
- ``instruction:NAME``: for each ``--template NAME=TEXT``, the instruction context with that template instead of
  the default one (TEXT is a ``teacher_template``: a str.format string with ``{prompt}`` and
  ``{demonstration}``; a backslash-n in TEXT is a newline), so candidate templates are measured before a run uses one.

Per task and context: the mean probability of y's first token and the mean log-probability per token of y
(nats). A teacher whose context does not raise these over the student's carries no signal to distil: measure
this before a sweep (issue: on-policy baselines that learn).

``--label-prefix "The answer is"`` adds, for the label tasks (emotion, topic), what matters once the student
has learnt the answer's form: after each context followed by the assistant's reply starting with that prefix,
the probabilities of the task's labels as the next word (each label's tokens scored in full, renormalised over
the labels). Reported: how often the gold label is the most likely one (``label_accuracy``; chance is 1 / the
number of labels), its mean renormalised probability (``p_gold``) and the label most often ranked first
(``top_label`` with its share). A teacher that ranks one label first whatever the demonstration says cannot
steer a student that writes "The answer is" towards the right label.

``--replies N`` adds what the teacher itself would answer: its greedy reply (up to ``--reply-tokens`` new
tokens) after each context, for the first N examples of every task, scored like an evaluation: the task's
reward against the example (``reward``, 0-100), the share of replies that keep the task's answer format
(``format_ok``), the share that end before the token limit (``finished``), the share that are the gold answer
verbatim (``verbatim``: the teacher copies the demonstration, e.g. arithmetic's worked computation) and the most
common reply opening.
A student matching a teacher token by token is pulled towards these replies: a teacher that knows the answer
but replies in another register (a chatty "I'm glad you're ...") teaches that register.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from opr.backbones import Backbone
from opr.benchmarks.mini_trace import EMOTION_LABELS, TOPIC_LABELS, load_mini_trace, named_labels
from opr.types import Example, Task

CONTEXTS = ("student", "instruction", "assistant_turn")
LABEL_TASKS = {"emotion": EMOTION_LABELS, "topic": TOPIC_LABELS}
CONF = Path(__file__).resolve().parents[2] / "conf"


def default_stream(backbone_name: str, model_dir: str | None = None) -> tuple[Backbone, list[Task]]:
    """The backbone (``smollm2_135m`` or ``tiny``, or the saved model folder ``model_dir``: a stage checkpoint of
    a SmolLM2 run) and the default stream's tasks: ``mini_trace`` with the options of
    ``conf/benchmark/mini_trace.yaml`` (its tasks, sizes, answer style), as ``python train.py`` builds them."""
    from opr.backbones import load_pretrained, load_smollm2_135m, load_tiny

    if model_dir is not None:
        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(f"--model {model_dir!r} is not a saved model folder (no config.json); give a stage "
                             "checkpoint, e.g. <run>/checkpoints/stage1_sft")
        backbone = load_pretrained(Path(model_dir).name, str(model_dir), system_prompt="")
    else:
        backbone = load_tiny() if backbone_name == "tiny" else load_smollm2_135m()
    options = OmegaConf.to_container(OmegaConf.load(CONF / "benchmark" / "mini_trace.yaml"))
    return backbone, load_mini_trace(**{k: v for k, v in options.items() if k not in ("_target_", "name")}).tasks


def context_text(backbone: Backbone, task: Task, example: Example, context: str, template: str,
                 templates: Mapping[str, str] | None = None) -> str:
    """The formatted text before the answer for one of :data:`CONTEXTS` or ``instruction:NAME`` (the template
    ``templates[NAME]`` in place of ``template``)."""
    if context == "student":
        return backbone.format_prompt(example.prompt, task.chat)
    name = context.removeprefix("instruction:")
    if name != context and templates and name in templates:
        template, context = templates[name], "instruction"
    if context == "instruction":
        return backbone.format_prompt(template.format(prompt=example.prompt, demonstration=example.answer), task.chat)
    if context == "assistant_turn":
        turns = [("user", example.prompt), ("assistant", example.answer), ("user", example.prompt)]
        return backbone.format_conversation(turns, task.chat)
    named = [f"instruction:{name}" for name in templates or {}]
    raise ValueError(f"unknown context {context!r}; allowed: {', '.join([*CONTEXTS, *named])}")


@torch.no_grad()
def answer_logprobs(backbone: Backbone, prefix: str, answer: str) -> torch.Tensor:
    """Log-probabilities [A] of the answer's tokens after ``prefix`` (teacher forcing, one sequence)."""
    tok = backbone.tokenizer
    p = backbone.encode_prompt(prefix)
    a = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a], device=next(backbone.model.parameters()).device)
    logits = backbone.model(input_ids=ids).logits[0, len(p) - 1 : -1].float()  # positions predicting a
    return logits.log_softmax(-1).gather(-1, ids[0, len(p):, None]).squeeze(-1)


@torch.no_grad()
def label_logprobs(backbone: Backbone, prefix: str, labels: Sequence[str]) -> torch.Tensor:
    """Summed log-probabilities [L] of each label (with a leading space, all its tokens) as the continuation of
    ``prefix``: one forward pass over the L sequences prefix + label, right-padded (a causal model's positions
    before the padding do not see it). Equal to summing :func:`answer_logprobs` per label."""
    tok = backbone.tokenizer
    p = backbone.encode_prompt(prefix)
    answers = [tok(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
    width = len(p) + max(len(a) for a in answers)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(backbone.model.parameters()).device
    ids = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for a in answers], device=device)  # [L, T]
    mask = torch.tensor([[1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a)) for a in answers], device=device)
    logp = backbone.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # [L, T, V]
    return torch.stack([logp[i, len(p) - 1 + torch.arange(len(a), device=device), ids[i, len(p):len(p) + len(a)]].sum()
                        for i, a in enumerate(answers)])


def label_choice(backbone: Backbone, prefix: str, labels: Sequence[str], gold: str) -> tuple[str, float]:
    """(the label ranked first, the gold label's probability renormalised over ``labels``) as the next word after
    ``prefix``; each label is scored with a leading space and all its tokens."""
    probs = label_logprobs(backbone, prefix, labels).softmax(-1)
    return labels[int(probs.argmax())], float(probs[list(labels).index(gold)])


def measure_labels(backbone: Backbone, tasks: Sequence[Task], per_task: int, template: str,
                   reply_prefix: str, templates: Mapping[str, str] | None = None) -> list[dict]:
    """One row per (label task, context): n, label_accuracy, p_gold, top_label, top_share (module docstring)."""
    backbone.model.eval()
    rows = []
    for task in tasks:
        if task.name not in LABEL_TASKS:
            continue
        labels = LABEL_TASKS[task.name]
        examples = task.train[:per_task]
        for context in contexts(templates):
            firsts, right, p_gold = [], 0, []
            for ex in examples:
                (gold,) = named_labels(ex.answer, labels)
                text = context_text(backbone, task, ex, context, template, templates)
                top, p = label_choice(backbone, text + reply_prefix, labels, gold)
                firsts.append(top)
                right += top == gold
                p_gold.append(p)
            top_label = max(labels, key=firsts.count)
            rows.append({"task": task.name, "context": context, "n": len(examples),
                         "label_accuracy": right / len(examples), "p_gold": sum(p_gold) / len(p_gold),
                         "top_label": top_label, "top_share": firsts.count(top_label) / len(examples)})
    return rows


def contexts(templates: Mapping[str, str] | None) -> list[str]:
    """:data:`CONTEXTS` and one ``instruction:NAME`` per named template."""
    return [*CONTEXTS, *(f"instruction:{name}" for name in templates or {})]


def parse_template(spec: str) -> tuple[str, str]:
    """``NAME=TEXT`` (``\\n`` in TEXT read as a newline) -> (NAME, TEXT), or a name of ``self_distill``'s
    ``TEACHER_TEMPLATES`` alone -> (NAME, its text); TEXT must have exactly the fields ``{prompt}`` and
    ``{demonstration}``, as ``method.teacher_template``."""
    from opr.methods.self_distill import TEACHER_TEMPLATES, SelfDistill

    if spec in TEACHER_TEMPLATES:
        return spec, TEACHER_TEMPLATES[spec]
    name, sep, text = spec.partition("=")
    if not sep or not name or ":" in name:
        raise ValueError(f"--template {spec!r}: expected NAME=TEXT with a NAME without ':', or one of "
                         f"{', '.join(TEACHER_TEMPLATES)}")
    try:  # self_distill's own check of a teacher_template
        return name, SelfDistill(teacher_template=text.replace("\\n", "\n")).template_text
    except ValueError as err:
        raise ValueError(f"--template {name}: {err}") from err


def measure(backbone: Backbone, tasks: Sequence[Task], per_task: int, template: str,
            templates: Mapping[str, str] | None = None) -> list[dict]:
    """One row per (task, context): n, mean first-token probability, mean per-token log-probability."""
    backbone.model.eval()
    rows = []
    for task in tasks:
        examples = task.train[:per_task]
        for context in contexts(templates):
            first, mean_lp = [], []
            for ex in examples:
                text = context_text(backbone, task, ex, context, template, templates)
                lp = answer_logprobs(backbone, text, ex.answer)
                first.append(float(lp[0].exp()))
                mean_lp.append(float(lp.mean()))
            rows.append({"task": task.name, "context": context, "n": len(examples),
                         "first_token_prob": sum(first) / len(first), "mean_logprob": sum(mean_lp) / len(mean_lp)})
    return rows


def measure_replies(backbone: Backbone, tasks: Sequence[Task], per_task: int, template: str,
                    templates: Mapping[str, str] | None = None, max_new_tokens: int = 24) -> list[dict]:
    """One row per (task, context): n, reward, format_ok, finished, the share of replies that are the gold
    answer verbatim (whitespace stripped: the teacher copies a demonstration, its working included), the most
    common opening (first three words) with its share, and the first three replies (module docstring)."""
    from opr.generation import SamplingConfig, generate

    backbone.model.eval()
    sampling = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=16)
    rows = []
    for task in tasks:
        examples = task.train[:per_task]
        for context in contexts(templates):
            prompts = [context_text(backbone, task, ex, context, template, templates) for ex in examples]
            replies = [g[0] for g in generate(backbone, prompts, sampling)]
            texts = [r.text for r in replies]
            openings = [" ".join(t.split()[:3]) for t in texts]
            top = max(openings, key=openings.count)
            rows.append({
                "task": task.name, "context": context, "n": len(examples),
                "reward": sum(float(task.reward(t, ex)) for t, ex in zip(texts, examples)) / len(examples),
                "format_ok": (sum(bool(task.format_ok(t)) for t in texts) / len(texts)
                              if task.format_ok is not None else None),
                "finished": sum(r.num_tokens < max_new_tokens for r in replies) / len(replies),  # ended by EOS
                "verbatim": sum(t.strip() == ex.answer.strip() for t, ex in zip(texts, examples)) / len(texts),
                "top_opening": top, "top_opening_share": openings.count(top) / len(openings),
                "examples": texts[:3],
            })
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from opr.methods.self_distill import SelfDistill
    from opr.tools.bench.common import table, write_json

    ap = argparse.ArgumentParser(prog="python -m opr.analysis.teacher_signal", description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=["smollm2_135m", "tiny"], default="smollm2_135m")
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="a saved model folder (a stage checkpoint of a SmolLM2 run) instead of --backbone: the "
                         "teacher of a later stage")
    ap.add_argument("--per-task", type=int, default=40, help="training examples per task (default 40)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--label-prefix", default=None,
                    help='also rank the labels after the reply starts with this, e.g. "The answer is"')
    ap.add_argument("--template", action="append", default=[], metavar="NAME=TEXT",
                    help="also measure the instruction context with this teacher_template, or with a named one of "
                         "self_distill's (answer_given, ...) (repeatable)")
    ap.add_argument("--replies", type=int, default=0, metavar="N",
                    help="also generate the teacher's greedy reply after each context for N examples per task")
    ap.add_argument("--reply-tokens", type=int, default=24, help="new tokens per reply (default 24)")
    ap.add_argument("--out", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.per_task < 1:
        ap.error(f"--per-task must be >= 1, got {args.per_task}")
    if args.replies < 0 or args.reply_tokens < 1:
        ap.error(f"--replies must be >= 0 and --reply-tokens >= 1, got {args.replies} and {args.reply_tokens}")
    try:
        templates = dict(parse_template(spec) for spec in args.template)
    except ValueError as err:
        ap.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        backbone, tasks = default_stream(args.backbone, args.model)
    except ValueError as err:
        ap.error(str(err))
    template = SelfDistill().template_text
    rows = measure(backbone, tasks, args.per_task, template, templates)
    print(table(rows, ["task", "context", "n", "first_token_prob", "mean_logprob"]))
    label_rows = []
    if args.label_prefix is not None:
        label_rows = measure_labels(backbone, tasks, args.per_task, template, args.label_prefix, templates)
        print(f"\nlabels after the reply prefix {args.label_prefix!r}:")
        print(table(label_rows, ["task", "context", "n", "label_accuracy", "p_gold", "top_label", "top_share"]))
    reply_rows = []
    if args.replies:
        reply_rows = measure_replies(backbone, tasks, args.replies, template, templates, args.reply_tokens)
        print(f"\nthe teacher's greedy replies ({args.replies} per task, up to {args.reply_tokens} tokens):")
        print(table(reply_rows, ["task", "context", "n", "reward", "format_ok", "finished", "verbatim",
                                 "top_opening", "top_opening_share"]))
    write_json(args.out, {"backbone": args.model or args.backbone, "per_task": args.per_task, "templates": templates, "rows": rows,
                          "label_prefix": args.label_prefix, "label_rows": label_rows, "reply_rows": reply_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
