"""``self_distill``: on-policy self-distillation from a demonstration-conditioned teacher.

(SDPO / on-policy SDFT: Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning"; Hübotter et
al. 2026, "Reinforcement Learning via Self-Distillation".) Per rollout batch, responses y are SAMPLED FROM
THE STUDENT (the current model) on prompts x of the stage's pool (the current task's training prompts, plus
budgeted replay prompts of past tasks with ``replay_budget: true``). The TEACHER is the same network shown a
demonstration in context: it scores the same y tokens given the teacher prompt (x + demo, see
``teacher_template``), and the student is trained, token by token at the visited states, to match it:

    student input = format(x) + y            teacher input = format(template(x, demo)) + y

Both are packed padding-free batches whose supervised positions are exactly the y tokens (same ids, same
order), so ``target_logits`` gives [M, V] logits for both and ``distill_loss`` compares them exactly over
the vocabulary (or on the teacher's top-k plus a tail bucket). Nothing of the teacher gets gradients.

Batching as in ``grpo``: one optimizer step covers the whole rollout batch, ``engine.batch_size`` responses
per micro-batch; ``steps`` × ``updates_per_batch`` optimizer steps make the stage (``engine.epochs``,
``engine.max_steps`` and ``engine.grad_accum`` do not apply). Memory: the ``frozen``/``ema`` teacher is a
full copy of the model (no optimizer state); ``student`` needs none.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from opr.losses.distill import KINDS, clipped_importance_weights, distill_loss
from opr.losses.sft import PackedBatch, pack, target_logits, token_nll
from opr.methods.base import StageContext, StageData, own_objective
from opr.methods.grpo import (
    StepLog,
    batch_stats,
    check_data,
    micro_batches,
    prompt_pool,
    prompt_schedule,
    step_seed,
)
from opr.rollout import Rollout, encode_response, frozen_copy, sample_rollouts

DEFAULT_TEACHER_TEMPLATE = (
    "{prompt}\n\nHere is an example of a good response to this request:\n{demonstration}\n\n"
    "Now write your own response to the request."
)


def template_fields(template: str) -> set[str]:
    """The ``{name}`` fields of a str.format template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """teacher ← (1 - rate) · teacher + rate · student, parameter by parameter (same architecture)."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.lerp_(ps.detach().to(device=pt.device, dtype=pt.dtype), rate)


@dataclass
class _DistillBatch:
    """One micro-batch: the student's and the teacher's packed sequences, scoring the same M response tokens,
    and the behaviour log-probs of those tokens ([M], recorded at the first update on these samples)."""

    student: PackedBatch
    teacher: PackedBatch
    logp_behaviour: Optional[torch.Tensor] = None


@dataclass
class SelfDistill:
    """Options:

    steps: rollout batches per stage; each gives ``updates_per_batch`` optimizer steps.
    prompts_per_step: prompts per rollout batch (capped at the pool size).
    samples_per_prompt: student samples per prompt.
    updates_per_batch: optimizer steps on one rollout batch. From the second on, the samples come from an
      older student; each token's loss is then weighted by min(π_current(y_k) / π_behaviour(y_k),
      ``importance_clip``) (truncated importance sampling, ``clipped_importance_weights``).
    temperature, top_p: sampling of the student's responses (temperature 0 = greedy, one sample).
    teacher_context: what the teacher sees besides the prompt:
      ``gold``: the example's gold answer;
      ``rollout``: a successful rollout of the same prompt in this batch (the highest-reward sample with
        reward >= ``min_reward``, which may be the scored response itself), falling back to the gold answer
        when none succeeded;
      ``none``: nothing (teacher input = student input: the loss is 0 while the teacher's weights equal the
        student's, always with ``teacher: student``, at the first step with ``frozen``/``ema``; later a pure
        KL anchor to the stage-start model: a control).
    teacher_template: str.format template of the teacher's prompt with fields ``{prompt}`` and
      ``{demonstration}``; chat-formatted like the student's prompt.
    teacher: ``frozen`` (a copy of the model at stage start), ``ema`` (that copy moved towards the student
      after every optimizer step by ``ema_rate``) or ``student`` (the current student itself, no copy;
      gradients are stopped).
    ema_rate: teacher ← (1 - ema_rate) · teacher + ema_rate · student.
    kind: ``reverse_kl`` = KL(student ‖ teacher) (expectation under the student, which sampled y; the
      on-policy distillation objective), ``forward_kl`` = KL(teacher ‖ student), or ``jsd`` (generalized
      JSD with weight ``jsd_alpha`` on the teacher, in (0, 1)).
    topk: null = exact full-vocabulary divergence; k = on the teacher's top-k tokens plus a tail bucket.
    importance_clip: truncation of the importance weights of stale samples (> 0).
    min_reward: a rollout is successful when its task reward reaches this (teacher_context rollout, stats).
    replay_budget: add the budgeted past-task prompts (those vanilla replay / OPR use) to the pool.
    teacher_length_factor: the teacher's sequences may be this many times ``engine.max_length`` long (its
      prompt carries the demonstration); longer teacher prompts lose their start.
    """

    name: str = "self_distill"
    steps: int = 20
    prompts_per_step: int = 8
    samples_per_prompt: int = 1
    updates_per_batch: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    teacher_context: str = "gold"
    teacher_template: str = DEFAULT_TEACHER_TEMPLATE
    teacher: str = "frozen"
    ema_rate: float = 0.05
    kind: str = "reverse_kl"
    jsd_alpha: float = 0.5
    topk: Optional[int] = None
    importance_clip: float = 2.0
    min_reward: float = 50.0
    replay_budget: bool = False
    teacher_length_factor: float = 2.0

    def __post_init__(self) -> None:
        for key in ("steps", "prompts_per_step", "samples_per_prompt", "updates_per_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.{key} must be >= 1, got {getattr(self, key)}")
        if self.temperature < 0:
            raise ValueError(f"method.temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError("method.temperature=0 (greedy) gives identical samples; set samples_per_prompt=1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"method.top_p must be in (0, 1], got {self.top_p}")
        if self.teacher_context not in ("gold", "rollout", "none"):
            raise ValueError(f"method.teacher_context must be 'gold', 'rollout' or 'none', got {self.teacher_context!r}")
        if self.teacher not in ("frozen", "ema", "student"):
            raise ValueError(f"method.teacher must be 'frozen', 'ema' or 'student', got {self.teacher!r}")
        if not 0 < self.ema_rate <= 1:
            raise ValueError(f"method.ema_rate must be in (0, 1], got {self.ema_rate}")
        if self.kind not in KINDS:
            raise ValueError(f"method.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "jsd" and not 0 < self.jsd_alpha < 1:
            raise ValueError(f"method.jsd_alpha must lie strictly between 0 and 1, got {self.jsd_alpha}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"method.topk must be >= 1 or null (full vocabulary), got {self.topk}")
        if not self.importance_clip > 0:
            raise ValueError(f"method.importance_clip must be > 0, got {self.importance_clip}")
        if self.teacher_length_factor < 1:
            raise ValueError(f"method.teacher_length_factor must be >= 1, got {self.teacher_length_factor}")
        fields = template_fields(self.teacher_template)
        if fields != {"prompt", "demonstration"}:
            raise ValueError(
                "method.teacher_template must contain exactly the fields {prompt} and {demonstration}; "
                f"got {sorted(fields)} in {self.teacher_template!r}"
            )

    def stage_data(self, ctx: StageContext) -> StageData:
        return prompt_pool(ctx, self.replay_budget)

    # ------------------------------------------------------------------ teacher input
    def demonstration(self, rollout: Rollout, group: Sequence[Rollout]) -> tuple[Optional[str], str]:
        """(demonstration text or None for no context, where it came from: gold | rollout | none)."""
        if self.teacher_context == "none":
            return None, "none"
        if self.teacher_context == "rollout":
            good = [r for r in group if r.reward >= self.min_reward]
            if good:
                best = max(good, key=lambda r: r.reward)  # ties: the first sampled
                return best.text, "rollout"
        return rollout.example.answer, "gold"

    def distill_batches(self, ctx: StageContext, groups: Sequence[Sequence[Rollout]]) -> tuple[list[_DistillBatch], dict]:
        """Packed student and teacher micro-batches (``trainer.batch_size`` responses each) of one batch."""
        bb, tok, tasks = ctx.backbone, ctx.backbone.tokenizer, ctx.tasks_by_name
        max_len = ctx.trainer.max_length
        teacher_len = int(max_len * self.teacher_length_factor)
        pairs, origins = [], {"gold": 0, "rollout": 0, "none": 0}
        for group in groups:
            for r in group:
                chat = tasks[r.example.task].chat
                prompt, response = encode_response(
                    tok, bb.format_prompt(r.example.prompt, chat), r.text, r.finished, max_len, r.token_ids
                )
                if not response:
                    continue
                demo, origin = self.demonstration(r, group)
                origins[origin] += 1
                if demo is None:
                    teacher_prompt = prompt
                else:
                    text = self.teacher_template.format(prompt=r.example.prompt, demonstration=demo)
                    ids = tok(bb.format_prompt(text, chat), add_special_tokens=False)["input_ids"]
                    teacher_prompt = ids[-(teacher_len - len(response)):]
                pairs.append(((prompt, response), (teacher_prompt, response)))
        micro = [
            _DistillBatch(pack([s for s, _ in chunk]), pack([t for _, t in chunk]))
            for chunk in micro_batches(pairs, ctx.trainer.batch_size)
        ]
        n = max(1, sum(origins.values()))
        return micro, {"sequences": len(pairs), "demo_from_rollout_fraction": origins["rollout"] / n}

    # ------------------------------------------------------------------ the loss
    def loss_fn(self, teacher: torch.nn.Module) -> Callable[[torch.nn.Module, _DistillBatch], tuple]:
        """``loss_fn(model, micro_batch) -> (Σ per-token divergence, metrics)`` for ``trainer.optimizer_step``."""

        def fn(model: torch.nn.Module, mb: _DistillBatch) -> tuple[torch.Tensor, dict]:
            device = next(model.parameters()).device
            student = mb.student.to(device)
            student_logits = target_logits(model, student)  # [M, V]
            with torch.no_grad():
                teacher_batch = mb.teacher.to(next(teacher.parameters()).device)
                teacher_logits = target_logits(teacher, teacher_batch).to(device)  # [M, V], same y tokens
            logp = -token_nll(student_logits.detach(), student.targets)  # [M] log π_current(y_k)
            weights = None
            if mb.logp_behaviour is None:  # first update on these samples: the current student sampled them
                mb.logp_behaviour = logp
            else:
                weights = clipped_importance_weights(logp[None], mb.logp_behaviour[None], self.importance_clip)
            mask = torch.ones(1, student.num_targets, dtype=torch.bool, device=device)
            out = distill_loss(
                student_logits[None], teacher_logits[None], mask, kind=self.kind, jsd_alpha=self.jsd_alpha,
                topk=self.topk, token_weights=weights,
            )
            metrics = {"importance_weight": float(weights.mean()) if weights is not None else 1.0}
            return out.per_token.sum(), metrics

        return fn

    # ------------------------------------------------------------------ the stage
    def train_identity(self, ctx: StageContext) -> dict:
        return own_objective(self, ctx)

    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        pool = check_data(data, self.name)
        trainer, model = ctx.trainer, ctx.backbone.model
        teacher = model if self.teacher == "student" else frozen_copy(model)
        loss_fn = self.loss_fn(teacher)
        trainer.begin_stage(self.steps * self.updates_per_batch)
        schedule = prompt_schedule(pool, self.prompts_per_step, self.steps, f"{self.name}/{ctx.seed}/{ctx.stage}")
        log = StepLog()
        for step, prompts in enumerate(schedule):
            clock = time.perf_counter()
            groups = sample_rollouts(
                ctx.backbone, prompts, ctx.tasks_by_name, self.samples_per_prompt, self.temperature, self.top_p,
                ctx.rollout_batch_size, seed=step_seed(ctx.seed, ctx.stage, step), compute_dtype=ctx.compute_dtype,
                max_prompt_tokens=ctx.max_prompt_tokens,
            )
            log.seconds_rollout += time.perf_counter() - clock
            row = batch_stats(groups, self.min_reward)
            micro, extra = self.distill_batches(ctx, groups)
            row.update(extra)
            if not micro:
                log.add(row, trainer)
                continue
            for update in range(self.updates_per_batch):
                out = trainer.optimizer_step(micro, loss_fn, [mb.student.num_targets for mb in micro])
                if self.teacher == "ema":
                    ema_update(teacher, model, self.ema_rate)
                log.add({**(row if update == 0 else {}), **out, "update": update}, trainer)
        del teacher
        batches = [r for r in log.rows if "sequences" in r]
        stale = [r["importance_weight"] for r in log.rows if r.get("update", 0) > 0]
        return log.summary(
            demo_from_rollout_fraction=sum(r["demo_from_rollout_fraction"] for r in batches) / len(batches),
            # mean truncated importance weight of the updates on stale samples (None: every update was fresh)
            mean_importance_weight=sum(stale) / len(stale) if stale else None,
        )
