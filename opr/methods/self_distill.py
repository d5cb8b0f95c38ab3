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

The stage loop is ``opr.methods.on_policy``'s, as ``grpo``'s. Memory: the ``frozen``/``ema``/``base`` teacher
is ``trainer.frozen_model``'s (no optimizer state): a full copy of the model, or under ZeRO-3 1/W of it per rank,
partitioned like the policy (the EMA moves each rank's part from the policy's part); ``student`` needs none.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from opr.backbones import keep_last
from opr.losses.distill import KINDS, clipped_importance_weights, distill_loss
from opr.losses.policy import token_entropy
from opr.losses.sft import PackedBatch, pack, target_logits, token_nll
from opr.methods import on_policy
from opr.methods.base import StageContext, StageData, own_objective
from opr.rollout import Rollout, select_rollouts

# Named teacher templates (``teacher_template`` takes a name or a template of its own). What the teacher
# replies after each, on SmolLM2-135M-Instruct, was measured with ``opr.analysis.teacher_signal`` (docs/studies/onpolicy_contrast.md):
TEACHER_TEMPLATES = {
    # the template of the instruction format (the default format until 2026-12-02): the teacher knows the label
    # (ranks the gold one first 12 of 12) but replies in a chatty register ("I'm glad you're happy to share ...")
    "example": ("{prompt}\n\nHere is an example of a good response to this request:\n{demonstration}\n\n"
                "Now write your own response to the request."),
    # the demonstration stated as the answer: the teacher knows the label as well and replies briefly
    # ("The correct answer is sadness.")
    "answer_given": "{prompt}\n\nThe correct answer is: {demonstration}\n\nGive this answer.",
}


@dataclass
class _DistillBatch:
    """One micro-batch: the student's and the teacher's packed sequences, scoring the same M response tokens,
    and the behaviour log-probs of those tokens ([M], recorded at the first update on these samples)."""

    student: PackedBatch
    teacher: PackedBatch
    logp_behaviour: Optional[torch.Tensor] = None
    num_targets = property(lambda self: self.student.num_targets)  # the response tokens the trainer counts


@dataclass
class SelfDistill:
    """Options:

    - steps: rollout batches per stage; each gives ``updates_per_batch`` optimizer steps.
    - prompts_per_step: prompts per rollout batch (capped at the pool size).
    - samples_per_prompt: student samples per prompt.
    - updates_per_batch: optimizer steps on one rollout batch. From the second on, the samples come from an
      older student; each token's loss is then weighted by min(π_current(y_k) / π_behaviour(y_k),
      ``importance_clip``) (truncated importance sampling, ``clipped_importance_weights``).
    - temperature, top_p: sampling of the student's responses (temperature 0 = greedy, one sample; the
      default 0.5 keeps a 135M student's samples short enough to finish).
    - max_new_tokens: the samples' token limit (null: the task's answer limit, which cuts most samples of a
      chatty model; give room to finish).
    - teacher_context: what the teacher sees besides the prompt:

      - ``gold``: the example's gold answer;
      - ``rollout``: a successful rollout of the same prompt in this batch (the highest-reward sample with
        reward >= ``min_reward``, which may be the scored response itself), falling back to the gold answer
        when none succeeded;
      - ``none``: nothing (teacher input = student input: the loss is 0 while the teacher's weights equal the
        student's, always with ``teacher: student``, at the first step with ``frozen``/``ema``; later a pure
        KL anchor to the stage-start model: a control).

    - teacher_format: how the teacher is shown the demonstration: ``instruction`` (default: one user turn built
      from ``teacher_template``) or ``assistant_turn`` (a conversation, user: prompt, assistant:
      demonstration, user: prompt, as if the model had answered the same request before). Measured with
      ``opr.analysis.teacher_signal`` on SmolLM2-135M (docs/studies/onpolicy_contrast.md): after assistant_turn the gold answer's first
      token gets probability ~0.5 (0.03 without a demonstration) but, once a reply has begun, the teacher
      ranks the gold label first for 0-2 of 12 prompts; after ``instruction`` with ``answer_given`` it ranks
      it first for 12 of 12 and its own greedy replies are right and short ("The correct answer is joy.").
    - teacher_template: the teacher's prompt with ``teacher_format: instruction``: a name of
      :data:`TEACHER_TEMPLATES` (``example``, ``answer_given``) or a str.format template of its own with the
      fields ``{prompt}`` and ``{demonstration}``; chat-formatted like the student's prompt.
    - teacher: ``frozen`` (a copy of the model at stage start), ``ema`` (that copy moved towards the student
      after every optimizer step by ``ema_rate``), ``student`` (the current student itself, no copy;
      gradients are stopped) or ``base`` (the model before stage 1, reloaded; an ablation: a teacher that
      does not inherit earlier stages' training, which ``frozen`` does from stage 2 on).
    - ema_rate: teacher ← (1 - ema_rate) · teacher + ema_rate · student.
    - kind: ``reverse_kl`` = KL(student ‖ teacher) (expectation under the student, which sampled y; the
      on-policy distillation objective), ``forward_kl`` = KL(teacher ‖ student), or ``jsd`` (generalized
      JSD with weight ``jsd_alpha`` on the teacher, in (0, 1)).
    - topk: null = exact full-vocabulary divergence; k = on the teacher's top-k tokens plus a tail bucket.
    - importance_clip: truncation of the importance weights of stale samples (> 0).
    - min_reward: a rollout is successful when its task reward reaches this (teacher_context rollout, stats).
    - replay_budget: add the budgeted past-task prompts (those vanilla replay / OPR use) to the pool.
    - teacher_length_factor: the teacher's sequences may be this many times ``engine.max_length`` long (its
      prompt carries the demonstration); longer teacher prompts lose their start.
    - stop_on_collapse: null (off) or ``{min_finished, patience}``: end the stage when the finished fraction
      stays below ``min_finished`` for ``patience`` rollout batches (:class:`opr.methods.on_policy.CollapseGuard`).
    """

    name: str = "self_distill"
    steps: int = 40
    prompts_per_step: int = 8
    samples_per_prompt: int = 1
    updates_per_batch: int = 1
    temperature: float = 0.5
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None
    teacher_context: str = "gold"
    teacher_format: str = "instruction"
    teacher_template: str = "answer_given"
    teacher: str = "frozen"
    ema_rate: float = 0.05
    kind: str = "reverse_kl"
    jsd_alpha: float = 0.5
    topk: Optional[int] = None
    importance_clip: float = 2.0
    min_reward: float = 50.0
    replay_budget: bool = False
    teacher_length_factor: float = 2.0
    stop_on_collapse: Optional[on_policy.CollapseGuard] = None

    def __post_init__(self) -> None:
        on_policy.check_options(self, ("steps", "prompts_per_step", "samples_per_prompt", "updates_per_batch"))
        if self.temperature < 0:
            raise ValueError(f"method.temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError("method.temperature=0 (greedy) gives identical samples; set samples_per_prompt=1")
        on_policy.check_choice(self, "teacher_context", ("gold", "rollout", "none"))
        on_policy.check_choice(self, "teacher", ("frozen", "ema", "student", "base"))
        on_policy.check_choice(self, "teacher_format", ("instruction", "assistant_turn"))
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
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template_text) if name is not None}
        if fields != {"prompt", "demonstration"}:
            raise ValueError(f"method.teacher_template must be one of {', '.join(TEACHER_TEMPLATES)} or a template "
                             "with exactly the fields {prompt} and {demonstration}; "
                             f"got {sorted(fields)} in {self.teacher_template!r}")

    @property
    def template_text(self) -> str:
        """The teacher's str.format template: ``teacher_template`` itself, or the named one it names."""
        return TEACHER_TEMPLATES.get(self.teacher_template, self.teacher_template)

    # the stage's data is its prompt pool; the budget counts only for its replay prompts; its own objective
    stage_data = on_policy.stage_data
    uses_budget = classmethod(on_policy.uses_replay_budget)
    train_identity = own_objective

    # ------------------------------------------------------------------ teacher input
    def demonstration(self, rollout: Rollout, group: Sequence[Rollout]) -> tuple[Optional[str], str]:
        """(demonstration text or None for no context, where it came from: gold | rollout | none)."""
        if self.teacher_context == "none":
            return None, "none"
        if self.teacher_context == "rollout":  # the best reward reaching min_reward; ties: the first sampled
            best = select_rollouts(group, "highest", "reward", "best", self.min_reward, unfinished="no_eos")
            if best:
                return best[0].text, "rollout"
        return rollout.example.answer, "gold"

    def distill_batches(self, ctx: StageContext, groups: Sequence[Sequence[Rollout]]) -> tuple[list[_DistillBatch], dict]:
        """Packed student and teacher micro-batches (``trainer.batch_size`` responses each) of one batch."""
        bb, tok, tasks = ctx.backbone, ctx.backbone.tokenizer, ctx.tasks_by_name
        teacher_len = int(ctx.trainer.max_length * self.teacher_length_factor)
        pairs, origins = [], {"gold": 0, "rollout": 0, "none": 0}
        for i, _, r, prompt, response in on_policy.encoded_rollouts(ctx, groups):
            demo, origin = self.demonstration(r, groups[i])
            origins[origin] += 1
            if demo is None:
                teacher_prompt = prompt
            else:
                chat, x = tasks[r.example.task].chat, r.example.prompt  # formatted like the student's prompt
                text = (bb.format_conversation([("user", x), ("assistant", demo), ("user", x)], chat)
                        if self.teacher_format == "assistant_turn"
                        else bb.format_prompt(self.template_text.format(prompt=x, demonstration=demo), chat))
                # encoded as the student's prompt is (the family's BOS on raw prompts), cut on the left keeping it
                teacher_prompt = keep_last(tok, bb.encode_prompt(text), teacher_len - len(response))
            pairs.append(((prompt, response), (teacher_prompt, response)))
        micro = [_DistillBatch(pack([s for s, _ in chunk]), pack([t for _, t in chunk]))
                 for chunk in on_policy.micro_batches(pairs, ctx.trainer.batch_size)]
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
            else:  # (a resumed stage's saved batch comes back on the CPU)
                weights = clipped_importance_weights(logp[None], mb.logp_behaviour.to(device)[None], self.importance_clip)
            mask = torch.ones(1, student.num_targets, dtype=torch.bool, device=device)
            out = distill_loss(student_logits[None], teacher_logits[None], mask, kind=self.kind,
                               jsd_alpha=self.jsd_alpha, topk=self.topk, token_weights=weights)
            return out.per_token.sum(), {"importance_weight": float(weights.mean()) if weights is not None else 1.0,
                                         "entropy": float(token_entropy(student_logits.detach()).mean())}

        return fn

    # ------------------------------------------------------------------ the stage
    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        model, trainer = ctx.backbone.model, ctx.trainer
        # the frozen teachers are laid out like the policy (a full copy; ZeRO-3: partitioned like it)
        if self.teacher == "student":
            teacher = model
        elif self.teacher == "base":
            teacher = trainer.frozen_model(ctx.load_base_model())
        else:
            teacher = trainer.frozen_model(model)
        ema = (lambda: trainer.ema_update(teacher, self.ema_rate)) if self.teacher == "ema" else None
        log = on_policy.train_on_policy(self, ctx, data, self.samples_per_prompt, self.distill_batches,
                                        self.loss_fn(teacher), after_step=ema,
                                        keep={"teacher": teacher} if teacher is not model else None)
        demo = on_policy.average([r["demo_from_rollout_fraction"] for r in log.batches if "sequences" in r])
        # mean truncated importance weight of the updates on stale samples (None: every update was fresh)
        stale = on_policy.average([r["importance_weight"] for r in log.rows if r.get("update", 0) > 0])
        return log.summary(demo_from_rollout_fraction=demo, mean_importance_weight=stale,
                           demo_from_rollout_fraction_per_step=log.per_step("demo_from_rollout_fraction"))
