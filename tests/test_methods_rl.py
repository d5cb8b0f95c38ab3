"""The rewrite, self-distillation and RL baselines (sdft, self_distill, grpo) and the drift diagnostics.

Everything runs on the tiny backbone (a random 2-layer Llama with a character tokenizer) in seconds. Direct
tests build a StageContext around a toy task instead of going through the loop, so that they depend on the
methods only, not on the benchmark generator.
"""

from __future__ import annotations

import json

import pytest
import torch

from opr.backbones import load_tiny
from opr.config import ConfigError, validate
from opr.diagnostics import base_logprob, greedy_responses, policy_kl, sample_probe
from opr.engine.torch_engine import TorchTrainer
from opr.methods.base import StageContext
from opr.methods.grpo import GRPO
from opr.methods.on_policy import prompt_schedule
from opr.methods.sdft import SDFT
from opr.methods.self_distill import SelfDistill
from opr.rollout import Rollout, encode_response, frozen_copy, sample_rollouts
from opr.run import run_experiment
from opr.types import Example, Task

# ----------------------------------------------------------------------------------------------------------
# helpers


def frac_a(prediction: str, example: Example) -> float:
    """Toy reward: 100 × the fraction of 'a' characters in the response (0 for an empty one)."""
    return 100.0 * prediction.count("a") / len(prediction) if prediction else 0.0


def toy_task(name: str = "toy", n: int = 8, reward=frac_a, max_new_tokens: int = 8) -> Task:
    train = [Example(f"{name}/train/{i}", name, f"Say something {i}", "aaaa") for i in range(n)]
    evals = [Example(f"{name}/eval/{i}", name, f"Say anything {i}", "aaaa") for i in range(4)]
    return Task(name, train, evals, reward=reward, max_new_tokens=max_new_tokens)


def toy_ctx(task: Task, lr: float = 1e-3, batch_size: int = 32, past: list[Task] | None = None, seed: int = 0):
    torch.manual_seed(seed)
    bb = load_tiny(seed=seed)
    trainer = TorchTrainer(bb, lr=lr, batch_size=batch_size, max_length=96, seed=seed)
    stage = 1 + len(past or [])
    return StageContext(stage, task, past or [], bb, trainer, budget=0.5, seed=seed, rollout_batch_size=8)


def check_results(run_dir, method: str) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete"
    assert res["config"]["method"]["name"] == method
    assert len(res["tasks"]) == 2 and len(res["matrix"]) == 3 and all(len(r) == 2 for r in res["matrix"])
    assert all(0 <= v <= 100 for row in res["matrix"] for v in row)
    for key in ("OP", "BWT", "FWT"):
        assert isinstance(res["metrics"][key], float)
    assert [s["stage"] for s in res["stages"]] == [0, 1, 2]
    for stage in range(3):
        for task in res["tasks"]:
            assert (run_dir / "predictions" / f"stage{stage}" / f"{task}.jsonl").exists()
    return res


# ----------------------------------------------------------------------------------------------------------
# end to end through run_experiment (2 stages each)


def test_sdft_runs_two_stages(tiny_cfg, tmp_path):
    run_experiment(tiny_cfg("method=sdft", "checkpoint.save=false"))
    res = check_results(tmp_path / "run", "sdft")
    for s in res["stages"][1:]:
        st = s["sdft"]
        assert st["rewrites"] == 12 and 0 <= st["kept"] <= 12
        assert st["kept_fraction"] == pytest.approx(st["kept"] / 12)
        assert s["train_examples"] == 12  # one example per gold answer, rewritten or not
        assert s["train"]["steps"] == 3 and s["train"]["mean_grad_norm"] > 0


def test_self_distill_runs_two_stages(tiny_cfg, tmp_path):
    # the stale-sample path (2 updates per batch), an EMA teacher, rollout demonstrations and replay prompts
    run_experiment(tiny_cfg(
        "method=self_distill", "method.steps=2", "method.prompts_per_step=4", "method.samples_per_prompt=2",
        "method.updates_per_batch=2", "method.teacher=ema", "method.teacher_context=rollout",
        "method.replay_budget=true", "budget=0.2", "checkpoint.save=false",
    ))
    res = check_results(tmp_path / "run", "self_distill")
    s1, s2 = res["stages"][1], res["stages"][2]
    assert s1["prompt_pool"] == {"current": 12, "replay": 0}
    assert s2["prompt_pool"] == {"current": 12, "replay": 2} and s2["replay"]["requested"] == 2
    for s in (s1, s2):
        t = s["train"]
        assert t["steps"] == 4 and t["rollout_batches"] == 2 and t["rollouts"] == 2 * 4 * 2
        assert len(t["reward_per_step"]) == 2 and len(t["grad_norm_per_step"]) == 4
        assert 0 <= t["success_fraction"] <= 1 and 0 <= t["demo_from_rollout_fraction"] <= 1
        assert 0 < t["mean_importance_weight"] <= 2.0
        assert t["first_loss"] >= 0  # a divergence


def test_self_distill_sdpo_preset_runs_two_stages(tiny_cfg, tmp_path):
    # the preset as it is (top-100 logits with a tail bucket, EMA teacher, groups of 4, rollout re-prompting)
    run_experiment(tiny_cfg("method=self_distill_sdpo", "method.steps=2", "checkpoint.save=false"))
    res = check_results(tmp_path / "run", "self_distill")
    for s in res["stages"][1:]:
        t = s["train"]
        assert t["rollout_batches"] == 2 and t["rollouts"] == 2 * 4 * 4
        assert 0 <= t["demo_from_rollout_fraction"] <= 1 and t["first_loss"] >= 0


@pytest.mark.parametrize("teacher", ["base", "frozen"])
def test_self_distill_base_teacher_is_the_model_before_stage_1(tiny_cfg, monkeypatch, teacher):
    """teacher=base distils from the untrained model at every stage; frozen, from stage 2 on, from the model
    that stage 1 trained."""
    from opr.config import build

    seen: dict[int, dict] = {}
    real = SelfDistill.loss_fn

    def recording(self, teacher_model):
        seen[len(seen) + 1] = {k: v.clone() for k, v in teacher_model.state_dict().items()}
        return real(self, teacher_model)

    monkeypatch.setattr(SelfDistill, "loss_fn", recording)
    cfg = tiny_cfg("method=self_distill", f"method.teacher={teacher}", "method.steps=2", "checkpoint.save=false",
                   "analysis.drift=false", "analysis.diagnostics=false")
    run_experiment(cfg)
    base = build(cfg.backbone, seed=cfg.seed).model.state_dict()
    assert sorted(seen) == [1, 2]
    for stage, weights in seen.items():
        same = all(torch.equal(weights[k], base[k]) for k in base)
        assert same == (teacher == "base" or stage == 1), (teacher, stage)


def test_grpo_runs_two_stages(tiny_cfg, tmp_path):
    run_experiment(tiny_cfg(
        "method=grpo", "method.steps=2", "method.prompts_per_step=4", "method.group_size=4", "method.kl_coef=0.05",
        "method.updates_per_batch=2", "method.replay_budget=true", "budget=0.2", "checkpoint.save=false",
    ))
    res = check_results(tmp_path / "run", "grpo")
    for s in res["stages"][1:]:
        t = s["train"]
        assert t["rollout_batches"] == 2 and t["rollouts"] == 2 * 4 * 4
        # kl_coef > 0: no batch is skipped, even when every group is degenerate (the KL term still trains)
        assert t["steps"] == 4 and t["skipped_steps"] == 0
        assert 0 <= t["degenerate_fraction"] <= 1 and 0 <= t["success_fraction"] <= 1
        assert t["mean_kl"] >= 0


def test_bad_options_are_rejected_before_anything_loads(tiny_cfg):
    for override, bad in [("method.kind=kl", "'kl'"), ("method.teacher=copy", "'copy'"),
                          ("method.teacher_template='{prompt} only'", "demonstration")]:
        with pytest.raises(ConfigError, match=bad):
            validate(tiny_cfg("method=self_distill", override))
    with pytest.raises(ConfigError, match="group_size"):
        validate(tiny_cfg("method=grpo", "method.group_size=1"))
    with pytest.raises(ConfigError, match="kl_estimator"):
        validate(tiny_cfg("method=grpo", "method.kl_estimator=k4"))
    with pytest.raises(ConfigError, match="answer"):
        validate(tiny_cfg("method=sdft", "method.template='{prompt}'"))


# ----------------------------------------------------------------------------------------------------------
# self_distill


@pytest.mark.parametrize("teacher", ["frozen", "student"])
def test_self_distill_loss_is_zero_when_teacher_sees_no_context(teacher):
    """teacher_context=none: teacher input == student input, and at the first step the teacher's weights
    equal the student's, so the logits agree and every divergence is exactly 0. (The gradient is 0 up to
    rounding: the softmax backward pass subtracts p · Σ p, which is 1 only to float precision.)"""
    task = toy_task()
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        ctx = toy_ctx(task)
        m = SelfDistill(steps=1, prompts_per_step=4, samples_per_prompt=2, teacher_context="none",
                        teacher=teacher, kind=kind)
        out = m.train_stage(ctx, m.stage_data(ctx))
        # jsd: log m = logsumexp(log p + log α, log p + log(1 - α)) equals log p only to rounding (~1e-10)
        assert abs(out["first_loss"]) <= (1e-8 if kind == "jsd" else 0.0), (kind, out)
        assert out["grad_norm_per_step"][0] < 1e-6, (kind, out)


def test_self_distill_teacher_and_student_score_the_same_tokens():
    task = toy_task()
    ctx = toy_ctx(task)
    m = SelfDistill(teacher_context="gold", teacher_format="instruction", teacher_template="example")
    groups = [[Rollout(ex, "abc", 0.0, True), Rollout(ex, "", 0.0, False)] for ex in task.train[:3]]
    micro, stats = m.distill_batches(ctx, groups)
    assert stats["sequences"] == 3  # the empty unfinished responses have nothing to score
    (mb,) = micro
    assert torch.equal(mb.student.targets, mb.teacher.targets)  # "abc" + EOS, three times
    assert mb.student.num_targets == 3 * 4
    assert mb.teacher.num_tokens > mb.student.num_tokens  # the teacher's prompt carries the demonstration
    text = ctx.backbone.tokenizer.decode(mb.teacher.input_ids[0])
    assert "Here is an example of a good response" in text and "aaaa" in text


def test_self_distill_assistant_turn_shows_the_demonstration_as_an_earlier_answer():
    task = toy_task()
    ctx = toy_ctx(task)
    m = SelfDistill(teacher_context="gold", teacher_format="assistant_turn")
    ex = task.train[0]
    micro, _ = m.distill_batches(ctx, [[Rollout(ex, "abc", 0.0, True)]])
    text = ctx.backbone.tokenizer.decode(micro[0].teacher.input_ids[0])
    turn = "<|im_start|>user\n" + ex.prompt + "<|im_end|>\n"
    # user: prompt, assistant: demonstration, user: prompt, then the assistant's cue and the scored response
    assert text.count(turn) == 2 and f"<|im_start|>assistant\n{ex.answer}<|im_end|>" in text
    assert "Here is an example" not in text
    assert torch.equal(micro[0].student.targets, micro[0].teacher.targets)
    with pytest.raises(ValueError, match="teacher_format must be .instruction. or .assistant_turn."):
        SelfDistill(teacher_format="system")


def test_self_distill_named_teacher_template():
    from opr.methods.self_distill import TEACHER_TEMPLATES

    task = toy_task()
    ctx = toy_ctx(task)
    ex = task.train[0]
    m = SelfDistill(teacher_context="gold", teacher_format="instruction", teacher_template="answer_given")
    assert m.template_text == TEACHER_TEMPLATES["answer_given"]
    micro, _ = m.distill_batches(ctx, [[Rollout(ex, "abc", 0.0, True)]])
    text = ctx.backbone.tokenizer.decode(micro[0].teacher.input_ids[0])
    assert f"{ex.prompt}\n\nThe correct answer is: {ex.answer}\n\nGive this answer." in text
    assert SelfDistill(teacher_template="{prompt} / {demonstration}").template_text == "{prompt} / {demonstration}"
    with pytest.raises(ValueError, match="one of example, answer_given or a template"):
        SelfDistill(teacher_template="answer_givn")


def test_self_distill_rollout_demonstration_falls_back_to_gold():
    ex = toy_task().train[0]
    m = SelfDistill(teacher_context="rollout", min_reward=50.0)
    low, high, top = Rollout(ex, "bbb", 0.0, True), Rollout(ex, "aab", 66.7, True), Rollout(ex, "aaa", 100.0, True)
    assert m.demonstration(low, [low]) == ("aaaa", "gold")
    assert m.demonstration(low, [low, high, top]) == ("aaa", "rollout")


# ----------------------------------------------------------------------------------------------------------
# grpo


def test_grpo_raises_a_toy_reward():
    """Reward = fraction of 'a' in the response; a random tiny model starts near 0 (1 char in ~100)."""
    ctx = toy_ctx(toy_task(), lr=1e-2)
    m = GRPO(steps=20, prompts_per_step=4, group_size=8, lr=None)  # the context's lr, 1e-2
    out = m.train_stage(ctx, m.stage_data(ctx))
    r = out["reward_per_step"]
    assert len(r) == 20 and out["steps"] + out["skipped_steps"] == 20
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert first < 10 and last > first + 30, r  # measured: ~3 -> ~99


def test_grpo_skips_batches_without_signal():
    """Every reward equal and no KL term: the gradient is exactly 0, so no optimizer step is taken."""
    ctx = toy_ctx(toy_task(reward=lambda p, e: 50.0))
    before = [p.detach().clone() for p in ctx.backbone.model.parameters()]
    m = GRPO(steps=2, prompts_per_step=2, group_size=2)
    out = m.train_stage(ctx, m.stage_data(ctx))
    assert out["steps"] == 0 and out["skipped_steps"] == 2 and out["degenerate_fraction"] == 1.0
    assert out["success_fraction"] == 1.0 and out["first_loss"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.backbone.model.parameters()))


def test_prompt_schedule_uses_every_prompt_before_repeating():
    pool = toy_task(n=5).train
    batches = prompt_schedule(pool, 2, 5, "k")
    flat = [e.id for b in batches for e in b]
    assert len(flat) == 10 and len(set(flat[:5])) == 5 and len(set(flat[5:])) == 5
    assert prompt_schedule(pool, 2, 5, "k") == batches  # seeded
    assert [len(b) for b in prompt_schedule(pool, 9, 2, "k")] == [5, 5]  # capped at the pool size


# ----------------------------------------------------------------------------------------------------------
# sdft


def test_sdft_keeps_rewrites_that_pass_the_reward():
    # the tiny model's greedy output is whitespace (an empty rewrite, never kept): sample instead
    always = toy_task(reward=lambda p, e: 100.0)
    ctx = toy_ctx(always)
    data = SDFT(require_finished=False, temperature=1.0).stage_data(ctx)
    kept = data.stats["sdft"]["kept"]
    assert kept == sum(ex.origin == "rewrite" for ex in data.examples) and kept > 0
    unfinished = data.stats["sdft"]["unfinished"]
    assert unfinished > 0  # the random model rarely stops within 8 tokens
    # ... the same rewrites (same seed), but those cut at the token limit are refused by default
    strict = SDFT(temperature=1.0).stage_data(ctx)
    assert strict.stats["sdft"]["unfinished"] == unfinished
    assert strict.stats["sdft"]["kept"] <= min(kept, 8 - unfinished)
    rewritten = {ex.example_id for ex in data.examples if ex.origin == "rewrite"}
    assert {ex.example_id for ex in strict.examples if ex.origin == "rewrite"} <= rewritten
    never = toy_task(reward=lambda p, e: 0.0)
    data = SDFT(require_finished=False, temperature=1.0).stage_data(toy_ctx(never))
    assert data.stats["sdft"]["kept_fraction"] == 0.0
    assert [ex.response for ex in data.examples] == ["aaaa"] * 8 and {ex.origin for ex in data.examples} == {"gold"}


# ----------------------------------------------------------------------------------------------------------
# golden first-step losses: measured once on this tiny setup (torch 2.13 CPU, seed 0) by running the test
# and copying the values printed in the assertion messages (identical over repeated runs). They catch silent
# changes to sampling, tokenisation, packing, the teacher prompt or the losses; change them only with a
# reason in the commit message.

GOLDEN_SDFT = 4.605754852  # SFT NLL on the sampled rewrites
GOLDEN_SELF_DISTILL = 0.001976272  # reverse KL(student ‖ gold-conditioned teacher) per token
# GRPO's first update has ratio 1, so its loss (-Σ advantage / tokens) pins sampling, rewards, advantages and
# lengths; the second update on the same batch pins the ratio and clipping after one step.
# Re-pinned when rollouts began to train their sampled token ids (not the re-encoded text): every toy response
# is cut at 8 tokens, so with equal lengths the first-update loss -Σ A_i·n_i / Σ n_i is exactly 0 (the group
# advantages sum to 0); the old value (-0.0118) came from re-encoded texts of unequal length.
GOLDEN_GRPO = (0.0, -0.050499041)


# Re-pinned when generation moved to per-row seeded generators (opr/generation.py: row_seed), which
# changes which tokens a given seed samples; greedy outputs did not change.
def test_golden_first_step_losses():
    task = toy_task(reward=lambda p, e: 100.0)
    ctx = toy_ctx(task)
    m = SDFT(require_finished=False, temperature=1.0)
    sdft = m.train_stage(ctx, m.stage_data(ctx))["first_loss"]
    assert sdft == pytest.approx(GOLDEN_SDFT, rel=1e-5), sdft

    ctx = toy_ctx(toy_task())
    m = SelfDistill(steps=1, prompts_per_step=4, samples_per_prompt=2, teacher_context="gold", temperature=1.0,
                    teacher_format="instruction", teacher_template="example")  # the path the golden was pinned on
    sd = m.train_stage(ctx, m.stage_data(ctx))["first_loss"]
    assert sd == pytest.approx(GOLDEN_SELF_DISTILL, rel=1e-4), sd

    ctx = toy_ctx(toy_task(reward=lambda p, e: 100.0 * len(p.strip()) / 8))  # rewards differ within groups
    m = GRPO(steps=1, prompts_per_step=4, group_size=4, updates_per_batch=2, lr=None)  # pinned at the context's lr
    out = m.train_stage(ctx, m.stage_data(ctx))
    grpo = (out["first_loss"], out["last_loss"])
    assert grpo == pytest.approx(GOLDEN_GRPO, rel=1e-5), grpo


# ----------------------------------------------------------------------------------------------------------
# diagnostics


def _brute_force(model_a, model_b, bb, prompts, tasks, responses):
    """Token-mean KL(a ‖ b) and log-prob under b, one unpacked sequence at a time."""
    kl_sum, lp_sum, n = 0.0, 0.0, 0
    for ex, r in zip(prompts, responses):
        p, y = encode_response(bb.tokenizer, bb.format_prompt(ex.prompt, tasks[ex.task].chat), r.text, r.finished, 512)
        ids = torch.tensor([p + y])
        with torch.no_grad():
            la = model_a(input_ids=ids).logits[0].log_softmax(-1)[len(p) - 1 : len(p) - 1 + len(y)].double()
            lb = model_b(input_ids=ids).logits[0].log_softmax(-1)[len(p) - 1 : len(p) - 1 + len(y)].double()
        kl_sum += float((la.exp() * (la - lb)).sum())
        lp_sum += float(lb.gather(1, torch.tensor(y)[:, None]).sum())
        n += len(y)
    return kl_sum / n, lp_sum / n


def test_diagnostics_match_a_brute_force_computation():
    a_task, b_task = toy_task("ta"), toy_task("tb")
    tasks = {"ta": a_task, "tb": b_task}
    probe = sample_probe([a_task, b_task], per_task=3, seed=0)
    assert len(probe) == 6 and probe == sample_probe([a_task, b_task], per_task=3, seed=0)
    bb = load_tiny(seed=0)
    base = frozen_copy(bb.model)
    with torch.no_grad():  # a "trained" model: the base plus noise
        for p in bb.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    responses = greedy_responses(bb, probe, tasks)
    assert len(responses) == 6
    kl = policy_kl(bb.model, base, bb, probe, tasks, responses)
    lp = base_logprob(base, bb, probe, tasks, responses, batch_size=4)
    want_kl, want_lp = _brute_force(bb.model, base, bb, probe, tasks, responses)
    assert kl["mean"] == pytest.approx(want_kl, rel=1e-4) and kl["mean"] > 0
    assert lp["mean"] == pytest.approx(want_lp, rel=1e-5) and lp["mean"] < 0
    assert kl["tokens"] == lp["tokens"] and kl["sequences"] == 6 and set(kl["per_task"]) == {"ta", "tb"}
    # responses=None: π_a's greedy responses are computed inside
    assert policy_kl(bb.model, base, bb, probe, tasks)["mean"] == pytest.approx(kl["mean"], rel=1e-6)
    assert policy_kl(base, base, bb, probe, tasks, responses)["mean"] == 0.0
    assert bb.model.training is False and base.training is False  # modes restored


def test_encode_response_eos_and_truncation():
    tok = load_tiny().tokenizer
    eos = tok.eos_token_id
    p, y = encode_response(tok, "hello", "ab", True, 64)
    assert y[-1] == eos and len(y) == 3 and len(p) == 5
    p, y = encode_response(tok, "hello", "ab", False, 64)
    assert eos not in y and len(y) == 2
    p, y = encode_response(tok, "hello", "abcdef", True, 4)  # response cut on the right, prompt on the left
    assert len(y) == 3 and eos not in y and p == tok("o", add_special_tokens=False)["input_ids"]
    # sampled ids win over the text (GRPO's logp_old and the distillation targets score what was sampled)
    p, y = encode_response(tok, "hello", "ab", True, 64, response_ids=(9, 8, 7, 6))
    assert y == [9, 8, 7, 6, eos]


def test_rollouts_carry_the_sampled_token_ids():
    """Regression: generation decoded the sampled ids to text and training re-encoded it, which can give other
    ids; rollouts now keep the ids, and they decode to the rollout's text."""
    from opr.benchmarks.mini_trace import load_mini_trace

    bb = load_tiny(seed=0)
    bench = load_mini_trace(num_tasks=1, train_size=4, eval_size=2, test_size=0, general_size=0)
    tasks = {t.name: t for t in bench.tasks}
    groups = sample_rollouts(bb, bench.tasks[0].train, tasks, num_samples=2, temperature=1.0, top_p=1.0, seed=1)
    for group in groups:
        for r in group:
            assert r.token_ids and bb.tokenizer.eos_token_id not in r.token_ids
            assert bb.tokenizer.decode(list(r.token_ids), skip_special_tokens=True) == r.text
            assert r.finished == (len(r.token_ids) < bench.tasks[0].max_new_tokens)


def test_a_rank_share_of_a_rollout_batch_samples_what_the_whole_batch_does(monkeypatch):
    """``sample_rollouts(indices=...)`` (a rank's share under engine=deepspeed: every world_size-th prompt)
    generates only those prompts, each with the seeds it has in the whole batch (its position among its task's
    prompts of the whole list), so the shares put back in order are the whole batch's rollouts."""
    import opr.rollout

    old, new = toy_task("old", n=4), toy_task("new", n=4)
    tasks = {"old": old, "new": new}
    prompts = [new.train[0], old.train[0], new.train[1], new.train[2], old.train[1], old.train[2], new.train[3]]
    bb = load_tiny(seed=0)
    kw = dict(num_samples=3, temperature=1.0, top_p=1.0, batch_size=2, seed=7)
    whole = sample_rollouts(bb, prompts, tasks, **kw)
    real, generated = opr.rollout.generate, []

    def counting(backbone, texts, sampling, **options):
        generated.extend(texts)
        return real(backbone, texts, sampling, **options)

    monkeypatch.setattr(opr.rollout, "generate", counting)
    for world in (2, 3):
        shares = []
        for rank in range(world):
            generated.clear()
            shares.append(sample_rollouts(bb, prompts, tasks, **kw, indices=range(rank, len(prompts), world)))
            assert len(generated) == len(shares[-1]) == len(range(rank, len(prompts), world))
        merged = [shares[i % world][i // world] for i in range(len(prompts))]
        assert [[(r.example, r.text, r.token_ids, r.reward) for r in g] for g in merged] == \
            [[(r.example, r.text, r.token_ids, r.reward) for r in g] for g in whole]
        assert [r.mean_logprob for g in merged for r in g] == \
            pytest.approx([r.mean_logprob for g in whole for r in g], abs=1e-5)
    assert sample_rollouts(bb, prompts, tasks, **kw, indices=[]) == []


@pytest.mark.parametrize("method", ["opr", "sdft", "grpo", "self_distill"])
def test_rollouts_cut_long_prompts_like_evaluation(method, monkeypatch):
    """``eval.max_prompt_length`` reaches every method's rollouts: generation sees prompts cut on the left."""
    import opr.rollout
    from opr.methods.opr import OnPolicyReplay

    seen: list[int] = []
    real = opr.rollout.generate

    def spy(backbone, prompts, sampling, **kw):
        seen.append(kw.get("max_prompt_tokens"))
        out = real(backbone, prompts, sampling, **kw)
        return out

    monkeypatch.setattr(opr.rollout, "generate", spy)
    past, task = toy_task("old"), toy_task("new")
    ctx = toy_ctx(task, past=[past])
    ctx.max_prompt_tokens = 12
    made = {"opr": lambda: OnPolicyReplay(samples_per_prompt=2), "sdft": SDFT,
            "grpo": lambda: GRPO(steps=1, prompts_per_step=2, group_size=2),
            "self_distill": lambda: SelfDistill(steps=1, prompts_per_step=2)}[method]()
    data = made.stage_data(ctx)
    if method in ("grpo", "self_distill"):
        made.train_stage(ctx, data)
    assert seen and set(seen) == {12}


def test_teacher_signal_measures_every_context(tmp_path):
    from opr.analysis.teacher_signal import CONTEXTS, main

    out = tmp_path / "signal.json"
    assert main(["--backbone", "tiny", "--per-task", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows[:3]] == list(CONTEXTS) and len(rows) == 3 * 3  # 3 default tasks
    assert all(0 <= r["first_token_prob"] <= 1 and r["mean_logprob"] <= 0 and r["n"] == 2 for r in rows)


def test_teacher_signal_ranks_the_labels_after_a_reply_prefix(tmp_path):
    from opr.analysis.teacher_signal import CONTEXTS, answer_logprobs, label_choice, main
    from opr.backbones import load_tiny

    out = tmp_path / "signal.json"
    assert main(["--backbone", "tiny", "--per-task", "3", "--label-prefix", "The answer is", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["label_rows"]
    assert [(r["task"], r["context"]) for r in rows] == [(t, c) for t in ("emotion", "topic") for c in CONTEXTS]
    for r in rows:  # 3 examples: accuracy and the top label's share are multiples of 1/3
        assert r["n"] == 3 and 0 < r["p_gold"] < 1 and r["top_share"] >= 1 / 3
        assert round(3 * r["label_accuracy"]) == 3 * r["label_accuracy"]
    # p_gold is the gold label's full-sequence probability renormalised over the labels
    backbone = load_tiny()
    labels = ["joy", "anger", "sadness"]
    top, p = label_choice(backbone, "Answer:", labels, "anger")
    totals = torch.tensor([float(answer_logprobs(backbone, "Answer:", " " + x).sum()) for x in labels])
    assert p == pytest.approx(float(totals.softmax(-1)[1]), rel=1e-5)
    assert top == labels[int(totals.argmax())]


def test_teacher_signal_batched_label_scores_equal_one_pass_per_label():
    from opr.analysis.teacher_signal import answer_logprobs, label_logprobs
    from opr.backbones import load_tiny

    backbone = load_tiny()
    labels = ["joy", "surprise", "shopping and more"]  # different token lengths: the batch is right-padded
    lengths = {len(backbone.tokenizer(" " + x, add_special_tokens=False)["input_ids"]) for x in labels}
    assert len(lengths) > 1
    batched = label_logprobs(backbone, "The answer is", labels)
    single = torch.stack([answer_logprobs(backbone, "The answer is", " " + x).sum() for x in labels])
    assert torch.allclose(batched, single, atol=1e-5)


def test_teacher_signal_measures_named_templates(tmp_path):
    from opr.analysis.teacher_signal import CONTEXTS, main
    from opr.methods.self_distill import SelfDistill

    out = tmp_path / "signal.json"
    default = SelfDistill().template_text.replace("\n", "\\n")  # the default template, given on the command line
    assert main(["--backbone", "tiny", "--per-task", "2", "--template", f"same={default}",
                 "--template", "hint={prompt}\\n(Answer: {demonstration})", "--template", "answer_given",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["templates"]["hint"] == "{prompt}\n(Answer: {demonstration})"
    assert data["templates"]["answer_given"].startswith("{prompt}\n\nThe correct answer is: {demonstration}")
    rows = {(r["task"], r["context"]): r for r in data["rows"]}
    assert {c for _, c in rows} == {*CONTEXTS, "instruction:same", "instruction:hint", "instruction:answer_given"}
    for task in ("emotion", "arithmetic", "topic"):  # the same template measures exactly as the default context
        assert rows[task, "instruction:same"]["mean_logprob"] == rows[task, "instruction"]["mean_logprob"]
        assert rows[task, "instruction:hint"]["mean_logprob"] != rows[task, "instruction"]["mean_logprob"]


@pytest.mark.parametrize("spec", ["noequals", "x={prompt} only", ":bad={prompt}{demonstration}"])
def test_teacher_signal_rejects_a_bad_template(spec, capsys):
    from opr.analysis.teacher_signal import main

    with pytest.raises(SystemExit) as err:
        main(["--backbone", "tiny", "--per-task", "1", "--template", spec])
    assert err.value.code == 2 and "--template" in capsys.readouterr().err


def test_teacher_signal_scores_the_teachers_own_replies(tmp_path, monkeypatch):
    from opr.analysis import teacher_signal
    from opr.generation import Generation

    # a fake generator: a teacher context that shows the demonstration replies with it, the student "pass"
    def fake_generate(backbone, prompts, sampling, **_):
        return [[Generation("pass" if "demo:" not in p else p.split("demo:")[1].split("|")[0], 3 if "demo:" in p
                            else sampling.max_new_tokens, 0.0)] for p in prompts]

    monkeypatch.setattr("opr.generation.generate", fake_generate)
    out = tmp_path / "signal.json"
    assert teacher_signal.main(["--backbone", "tiny", "--per-task", "1", "--replies", "3", "--reply-tokens", "5",
                                "--template", "demo={prompt} demo:{demonstration}|", "--out", str(out)]) == 0
    rows = {(r["task"], r["context"]): r for r in json.loads(out.read_text())["reply_rows"]}
    for task in ("emotion", "arithmetic", "topic"):
        student, demo = rows[task, "student"], rows[task, "instruction:demo"]
        assert student["n"] == demo["n"] == 3
        assert student["reward"] == 0 and student["finished"] == 0 and student["top_opening"] == "pass"
        assert demo["reward"] == 100 and demo["format_ok"] == 1 and demo["finished"] == 1  # the gold answers
        assert student["verbatim"] == 0 and demo["verbatim"] == 1 and student["examples"] == ["pass"] * 3
    with pytest.raises(SystemExit):
        teacher_signal.main(["--backbone", "tiny", "--replies", "-1"])


def test_teacher_signal_loads_a_saved_stage_checkpoint(tmp_path, capsys):
    """--model DIR measures a saved model (the teacher of a later stage) instead of the base backbone: a
    checkpoint of the tiny model measures exactly as the tiny model; a folder without a model is refused."""
    from opr import checkpoint as ckpt
    from opr.analysis.teacher_signal import main
    from opr.backbones import load_tiny

    folder = ckpt.save_stage(tmp_path / "checkpoints", 1, load_tiny(), {"task": "emotion"})
    saved, base = tmp_path / "saved.json", tmp_path / "base.json"
    assert main(["--model", str(folder), "--per-task", "2", "--out", str(saved)]) == 0
    assert main(["--backbone", "tiny", "--per-task", "2", "--out", str(base)]) == 0
    a, b = json.loads(saved.read_text()), json.loads(base.read_text())
    assert a["backbone"] == str(folder) and b["backbone"] == "tiny"
    for x, y in zip(a["rows"], b["rows"]):
        assert (x["task"], x["context"]) == (y["task"], y["context"])
        assert x["mean_logprob"] == pytest.approx(y["mean_logprob"], abs=1e-5)
    with pytest.raises(SystemExit) as err:
        main(["--model", str(tmp_path), "--per-task", "1"])
    assert err.value.code == 2 and "is not a saved model folder (no config.json)" in capsys.readouterr().err


def test_grpo_lr_option_sets_the_policy_updates_learning_rate(tiny_cfg):
    def by_length(p, e):  # rewards differ within groups, so the update is not skipped
        return 100.0 * len(p.strip()) / 8

    ctx = toy_ctx(toy_task(reward=by_length))  # engine.lr is 1e-3 here
    m = GRPO(steps=1, prompts_per_step=4, group_size=4, lr=2e-5)
    m.train_stage(ctx, m.stage_data(ctx))
    assert ctx.trainer.last_step["lr"] == 2e-5
    ctx = toy_ctx(toy_task(reward=by_length))
    m = GRPO(steps=1, prompts_per_step=4, group_size=4, lr=None)  # null: engine.lr
    m.train_stage(ctx, m.stage_data(ctx))
    assert ctx.trainer.last_step["lr"] == 1e-3
    with pytest.raises(ConfigError, match=r"method.lr must be > 0 or null \(null: engine.lr\), got 0"):
        validate(tiny_cfg("method=grpo", "method.lr=0"))
    # sft_then_grpo's RL phase has rl_lr, not a second learning rate under method.rl
    with pytest.raises(ConfigError, match="lr"):
        validate(tiny_cfg("method=sft_then_grpo", "+method.rl.lr=1e-5"))


def test_rank_micro_batches_split_the_update_and_even_out_with_zero_weight_copies():
    from opr.engine.base import ZeroWeight
    from opr.methods.on_policy import rank_micro_batches

    micro = ["a", "b", "c", "d", "e"]
    parts = [rank_micro_batches(micro, r, 2) for r in range(2)]
    # contiguous shares (2 and 3 micro-batches), the short one evened out with a zero-weight copy of its first
    assert parts[0][:2] == ["a", "b"] and isinstance(parts[0][2], ZeroWeight) and parts[0][2].batch == "a"
    assert parts[1] == ["c", "d", "e"]
    assert [mb for p in parts for mb in p if not isinstance(mb, ZeroWeight)] == micro  # each once, in order
    # fewer micro-batches than ranks: an empty share runs a copy of the first micro-batch
    three = [rank_micro_batches(["a"], r, 3) for r in range(3)]
    assert [len(p) for p in three] == [1, 1, 1] and three[2] == ["a"]
    assert all(isinstance(p[0], ZeroWeight) and p[0].batch == "a" for p in three[:2])
    assert ZeroWeight("a").num_targets == 0
    assert rank_micro_batches(micro, 0, 1) == micro


def test_zero_weight_copies_compute_what_a_first_update_caches():
    """A filler copy made before the first update has no cached log-probs: its loss calls the frozen models as
    the other ranks' real micro-batches do (under ZeRO-3 those forwards are collectives)."""
    from opr.losses.sft import pack
    from opr.methods.grpo import _PolicyBatch
    from opr.methods.on_policy import _on_cpu, rank_micro_batches

    mb = _PolicyBatch(pack([([1, 2], [3, 4])]), torch.tensor([0.5]))
    filler = rank_micro_batches([mb, mb, mb], 0, 2)[1]
    mb.logp_old = torch.zeros(2)  # the real micro-batch's first update caches it
    assert filler.batch.logp_old is None and filler.batch.batch is mb.batch
    moved = _on_cpu(mb)
    assert moved is not mb and torch.equal(moved.logp_old, mb.logp_old) and moved.batch is mb.batch
