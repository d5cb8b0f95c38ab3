"""Batched generation (opr/generation.py): greedy outputs equal transformers' ``generate``, results come back
in input order, finished rows leave the batch without changing the others, sampling is seeded per row."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from opr.backbones import load_tiny
from opr.generation import Generation, SamplingConfig, generate, length_sorted_batches, process_logits

QUESTIONS = [
    "hi",
    "What is 2+2? Explain.",
    "A much longer prompt about the weather in Madrid today, and tomorrow, and the day after.",
    "x",
    "Which emotion does the sentence express? Anna was thrilled about the cake.",
]


def hf_greedy(bb, prompt: str, max_new_tokens: int) -> tuple[list[int], float]:
    """One prompt alone through ``model.generate`` (no padding): new tokens before EOS, mean log-prob."""
    tok = bb.tokenizer
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = bb.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    lps = [float(s[0].log_softmax(-1)[t]) for s, t in zip(out.scores, new)]
    n = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
    return new[:n], (sum(lps[:n]) / n if n else lps[0])


def varied_tiny():
    """The tiny model with its own random output layer: the tied one makes a random model repeat the last
    prompt token forever, which would make every comparison below trivially equal."""
    bb = load_tiny()
    g = torch.Generator().manual_seed(0)
    w = bb.model.lm_head.weight
    bb.model.lm_head.weight = torch.nn.Parameter(torch.randn(w.shape, generator=g) * 2.0)
    return bb


@pytest.fixture(scope="module")
def tiny():
    return varied_tiny()


@pytest.fixture(scope="module")
def tiny_eos():
    """The tiny model with a frequent output character as EOS, so that rows finish at different steps."""
    bb = varied_tiny()
    prompts = [bb.format_prompt(q, True) for q in QUESTIONS]
    outs = generate(bb, prompts, SamplingConfig(max_new_tokens=12), desc=False)
    texts = [g[0].text for g in outs]

    def spread(c: str) -> int:  # how many different stopping steps this character as EOS would give
        return len({t.index(c) if c in t else len(t) for t in texts})

    bb.tokenizer.eos_token = max(sorted(set("".join(texts))), key=spread)
    return bb


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_greedy_equals_hf_generate(tiny, batch_size):
    prompts = [tiny.format_prompt(q, True) for q in QUESTIONS]
    outs = generate(tiny, prompts, SamplingConfig(max_new_tokens=16, batch_size=batch_size), desc=False)
    assert len(outs) == len(prompts)
    assert len({g[0].text for g in outs}) == len(prompts)  # distinct outputs: an order mix-up would show
    for prompt, gens in zip(prompts, outs):  # results in input order: compare each with its own prompt
        ref, ref_lp = hf_greedy(tiny, prompt, 16)
        assert len(gens) == 1
        assert gens[0].text == tiny.tokenizer.decode(ref, skip_special_tokens=True)
        assert gens[0].num_tokens == len(ref)
        assert gens[0].mean_logprob == pytest.approx(ref_lp, abs=1e-4)


def test_eos_stops_rows_and_matches_hf(tiny_eos):
    bb = tiny_eos
    prompts = [bb.format_prompt(q, True) for q in QUESTIONS]
    outs = generate(bb, prompts, SamplingConfig(max_new_tokens=12, batch_size=5), desc=False)
    lengths = [g[0].num_tokens for g in outs]
    assert min(lengths) < 12, lengths  # some rows finished early: the early-stop path ran
    assert len(set(lengths)) > 1, lengths
    for prompt, gens in zip(prompts, outs):
        ref, ref_lp = hf_greedy(bb, prompt, 12)
        assert bb.tokenizer.eos_token not in gens[0].text
        assert gens[0].num_tokens == len(ref)
        assert gens[0].text == bb.tokenizer.decode(ref, skip_special_tokens=True)
        assert gens[0].mean_logprob == pytest.approx(ref_lp, abs=1e-4)


def test_max_prompt_tokens_cuts_on_the_left(tiny):
    long = QUESTIONS[2]  # plain text: the tiny tokenizer gives one token per character
    tail = long[-20:]
    cut = generate(tiny, [long], SamplingConfig(max_new_tokens=8), max_prompt_tokens=20, desc=False)
    alone = generate(tiny, [tail], SamplingConfig(max_new_tokens=8), desc=False)
    full = generate(tiny, [long], SamplingConfig(max_new_tokens=8), desc=False)
    assert cut[0][0] == alone[0][0]
    assert cut[0][0].text != full[0][0].text
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        generate(tiny, [long], SamplingConfig(), max_prompt_tokens=0)


def same(a: list[list[Generation]], b: list[list[Generation]]) -> None:
    """Equal texts and token counts; log-probs equal up to the float rounding of a different batch shape."""
    assert [[(g.text, g.num_tokens) for g in gens] for gens in a] == [[(g.text, g.num_tokens) for g in gens] for gens in b]
    for x, y in zip(sum(a, []), sum(b, [])):
        assert x.mean_logprob == pytest.approx(y.mean_logprob, abs=1e-5)


def test_sampling_seeded_per_row(tiny_eos):
    bb = tiny_eos
    prompts = [bb.format_prompt(q, True) for q in QUESTIONS]
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, num_samples=3, batch_size=2)
    a = generate(bb, prompts, cfg, seed=7, desc=False)
    assert [len(g) for g in a] == [3] * len(prompts)
    assert all(g.mean_logprob <= 0 for gens in a for g in gens)
    # same seed: same samples, whatever the batch size
    b = generate(bb, prompts, SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, num_samples=3,
                                             batch_size=5), seed=7, desc=False)
    same(a, b)
    # a prompt's samples depend on its position in the list, not on its batch neighbours
    alone = generate(bb, prompts[:1], cfg, seed=7, desc=False)
    same(alone, a[:1])
    # different seed or sample index: different text (a random model samples widely)
    c = generate(bb, prompts, cfg, seed=8, desc=False)
    assert [g.text for gens in a for g in gens] != [g.text for gens in c for g in gens]
    assert len({g.text for g in a[2]}) > 1


def test_process_logits_matches_hf_warpers():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for temperature, top_p in [(0.7, 0.9), (1.0, 0.5), (1.3, 1.0), (0.5, 0.05), (3.0, 0.95)]:
        ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone())) \
            if top_p < 1 else TemperatureLogitsWarper(temperature)(None, logits.clone())
        for candidates in (1024, 8, 2):  # nucleus inside the top-k candidates, or the full-sort fallback
            ours = process_logits(logits, temperature, top_p, candidates=candidates)
            assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (temperature, top_p, candidates)
            assert torch.allclose(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])
    assert torch.equal(process_logits(logits, 0.0, 0.5), logits)


def test_process_logits_sorts_only_flat_rows_and_matches_hf():
    """A batch mixing peaked rows (nucleus inside the top-k) and flat rows (nucleus wider than k, so they
    alone take the full-vocabulary sort): every row equals transformers' warpers."""
    torch.manual_seed(1)
    peaked = torch.randn(3, 200) * 0.1
    peaked[:, :3] += 12.0  # three tokens hold nearly all the mass
    flat = torch.randn(2, 200) * 0.1  # nearly uniform: the nucleus holds ~190 tokens
    logits = torch.cat([peaked[:1], flat[:1], peaked[1:], flat[1:]])
    ref = TopPLogitsWarper(0.95)(None, logits.clone())
    ours = process_logits(logits, 1.0, 0.95, candidates=16)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = torch.isfinite(ours).sum(-1).tolist()
    assert kept[0] <= 3 and kept[2] <= 3 and kept[3] <= 3 and kept[1] > 16 and kept[4] > 16, kept


def test_length_sorted_batches_and_empty():
    assert length_sorted_batches([3, 9, 1, 7], 2) == [[1, 3], [0, 2]]
    assert generate(load_tiny(), [], SamplingConfig()) == []


@pytest.mark.slow
def test_greedy_equals_hf_generate_smollm2():
    from opr.backbones import load_smollm2_135m
    from opr.benchmarks.mini_trace import load_mini_trace

    bb = load_smollm2_135m()
    bench = load_mini_trace(train_size=1, eval_size=2, test_size=0, general_size=1)
    prompts = [bb.format_prompt(ex.prompt, t.chat) for t in bench.tasks[:3] for ex in t.eval[:1]]
    outs = generate(bb, prompts, SamplingConfig(max_new_tokens=24, batch_size=3), desc=False)
    for prompt, gens in zip(prompts, outs):
        ref, ref_lp = hf_greedy(bb, prompt, 24)
        assert gens[0].text == bb.tokenizer.decode(ref, skip_special_tokens=True)
        assert gens[0].mean_logprob == pytest.approx(ref_lp, abs=1e-3)


def test_shared_prefill_samples_at_low_temperature_equal_greedy(tiny):
    """num_samples > 1 decodes each prompt's samples from one prefill (the KV cache is repeated); at a
    temperature near 0 every sample must be the greedy completion of its own prompt."""
    prompts = [tiny.format_prompt(q, True) for q in QUESTIONS]
    greedy = generate(tiny, prompts, SamplingConfig(max_new_tokens=10, batch_size=2), desc=False)
    cold = generate(tiny, prompts, SamplingConfig(max_new_tokens=10, temperature=1e-4, num_samples=3, batch_size=2),
                    desc=False)
    for g, c in zip(greedy, cold):
        assert [x.text for x in c] == [g[0].text] * 3


# ------------------------------------------------------------------ benchmark helpers (opr/tools/bench)
def test_bench_time_breakdown_and_grouping():
    from opr.config import run_budget
    from opr.tools.bench.end_to_end import breakdown
    from opr.tools.bench.scaling import _series, group

    results = {
        "seconds_setup": {"model_load": 2.0, "benchmark": 0.5},
        "seconds_total": 23.0,
        "stages": [{"stage": 0, "task": None, "seconds": {"eval": 3.0}},
                   {"stage": 1, "task": "a", "seconds": {"data": 1.0, "train": 5.0, "eval": 3.0, "checkpoint": 1.0}},
                   {"stage": 2, "task": "b", "seconds": {"data": 2.0, "train": 4.0, "eval": 3.0, "drift": 0.5}}],
    }
    b = breakdown(results)
    assert (b["evaluation"], b["rollout"], b["training"], b["checkpointing"], b["drift"]) == (9.0, 3.0, 9.0, 1.0, 0.5)
    assert b["other"] == pytest.approx(23.0 - 22.5)  # loop time outside the stage parts
    assert b["wall"] == pytest.approx(2.5 + 23.0)
    assert run_budget({"budget": 0.05}) == 0.05 and run_budget({"budget": {"ratio": 0.2}}) == 0.2
    assert run_budget({"budget": 0.05, "method": {"name": "seq_sft"}}) is None  # the method ignores it
    rows = [{"method": "opr", "budget": b, "num_tasks": n, "wall": w, "status": status,
             **{f"{p}_per_stage": w for p in ("rollout", "training", "evaluation", "checkpointing")}}
            for b, n, w, status in ((0.1, 3, 1.0, "complete"), (0.1, 3, 3.0, "complete"), (0.1, 3, 50.0, "running"),
                                    (0.1, 4, 9.0, "complete"), (0.2, 3, 5.0, "complete"))]
    by_budget = group(rows, "budget", fixed="num_tasks")
    # the unfinished run is left out of the means, and the 4-task run is not averaged into the 3-task series
    assert [(g["num_tasks"], g["budget"], g["runs"], g["wall"]) for g in by_budget] == [
        (3, 0.1, 2, 2.0), (3, 0.2, 1, 5.0), (4, 0.1, 1, 9.0)]
    assert by_budget[0]["training_per_stage"] == 2.0
    by_tasks = group(rows, "num_tasks", fixed="budget")
    assert [(g["budget"], g["num_tasks"], g["wall"]) for g in by_tasks] == [(0.1, 3, 2.0), (0.1, 4, 9.0), (0.2, 3, 5.0)]
    # only the series that vary are plotted: budget 0.1 over 3 and 4 tasks; budget 0.2 has one point
    assert {k: [r["num_tasks"] for r in rs] for k, rs in _series(by_tasks, "num_tasks", "budget").items()} == {
        ("opr", 0.1): [3, 4]}


def test_bench_mixed_examples_round_robin():
    from opr.tools.bench.common import load_mini_trace_all, mixed_examples

    bench = load_mini_trace_all(2)
    pairs = mixed_examples(bench.tasks, 9)
    assert [t.name for t, _ in pairs[:7]] == [t.name for t in bench.tasks]
    assert pairs[7][1] == bench.tasks[0].eval[1]
    with pytest.raises(ValueError, match="hold only"):
        mixed_examples(bench.tasks, 15)


def test_sample_tokens_follows_probs_and_never_picks_filtered():
    from opr.generation import sample_tokens

    probs = torch.tensor([[0.0, 0.7, 0.3, 0.0]]).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    picks = sample_tokens(probs, gens)
    assert set(picks.tolist()) <= {1, 2}
    assert (picks == 1).float().mean().item() == pytest.approx(0.7, abs=0.03)


# ------------------------------------------------------------------ per-prompt token limits (one evaluation pass)
def test_per_prompt_limits_equal_hf_generate_with_each_limit(tiny_eos):
    """Prompts of several tasks share one pass, each with its own token limit: every answer is the one
    ``model.generate`` gives that prompt alone with that limit (rows at their limit leave the batch, EOS too)."""
    from opr.generation import encode_prompts, generate_encoded

    bb = tiny_eos
    prompts = [bb.format_prompt(q, True) for q in QUESTIONS]
    limits = [3, 12, 1, 7, 12]
    outs = generate_encoded(bb, encode_prompts(bb, prompts), SamplingConfig(max_new_tokens=12, batch_size=5),
                            max_new_tokens=limits, desc=False)
    assert [g[0].num_tokens <= m for g, m in zip(outs, limits)] == [True] * 5
    assert any(g[0].num_tokens == m < 12 for g, m in zip(outs, limits))  # a limit below the batch's cut a row
    for prompt, limit, gens in zip(prompts, limits, outs):
        ref, ref_lp = hf_greedy(bb, prompt, limit)
        assert gens[0].text == bb.tokenizer.decode(ref, skip_special_tokens=True)
        assert gens[0].num_tokens == len(ref)
        assert gens[0].mean_logprob == pytest.approx(ref_lp, abs=1e-4)
    # all limits equal: the same as the shared limit
    equal = generate_encoded(bb, encode_prompts(bb, prompts), SamplingConfig(max_new_tokens=12, batch_size=2),
                             max_new_tokens=[12] * 5, desc=False)
    same(equal, generate(bb, prompts, SamplingConfig(max_new_tokens=12, batch_size=2), desc=False))


def test_per_prompt_limits_are_checked(tiny):
    from opr.generation import encode_prompts, generate_encoded

    encoded = encode_prompts(tiny, ["hi", "yo"])
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 8\].*got 9"):
        generate_encoded(tiny, encoded, SamplingConfig(max_new_tokens=8), max_new_tokens=[2, 9])
    with pytest.raises(ValueError, match="max_new_tokens has 1 entries for 2 prompts"):
        generate_encoded(tiny, encoded, SamplingConfig(max_new_tokens=8), max_new_tokens=[2])
    with pytest.raises(ValueError, match="prompt 0 encodes to no tokens"):
        encode_prompts(tiny, [""])


def test_decoding_raises_no_deprecation_from_transformers(tiny):
    """transformers 5.25 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns, and 5.40
    removes it): the decode loop passes the cache under the name the installed model takes."""
    import warnings

    from opr.generation import cache_keyword, encode_prompts, generate_encoded

    assert cache_keyword(tiny.model) in ("cache", "past_key_values")
    prompts = [tiny.format_prompt(q, True) for q in QUESTIONS]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        generate(tiny, prompts, SamplingConfig(max_new_tokens=4, batch_size=2), desc=False)
        generate(tiny, prompts, SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=2), desc=False)
        generate_encoded(tiny, encode_prompts(tiny, prompts), SamplingConfig(max_new_tokens=4),
                         max_new_tokens=[1, 4, 2, 4, 3], desc=False)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_finished_rows_looked_for_every_k_steps_give_the_same_answers(tiny_eos, temperature):
    """The GPU path looks for finished rows every few steps (one host sync each time) instead of at every
    step: rows that ended decode on until then, and what they wrote after their end is discarded, so each
    row's answer is the one of the every-step path (log-probs up to the rounding of another batch shape)."""
    from opr.generation import decode_batch, encode_prompts

    bb = tiny_eos
    encoded = encode_prompts(bb, [bb.format_prompt(q, True) for q in QUESTIONS])
    S = 1 if temperature == 0 else 2
    cfg = SamplingConfig(max_new_tokens=12, temperature=temperature, num_samples=S)
    limits = [3, 12, 1, 7, 12]

    def run(k: int):
        gens = None if S == 1 else [torch.Generator().manual_seed(r) for r in range(len(encoded) * S)]
        with torch.no_grad():
            return decode_batch(bb.model, encoded, cfg, bb.eos_ids, bb.tokenizer.pad_token_id, gens,
                                max_new_tokens=limits, check_every=k)

    every = run(1)
    lengths = [len(t) for t, _ in every]
    assert len(set(lengths)) > 2 and min(lengths) < 12, lengths  # rows end at different steps
    assert all(len(t) <= m for (t, _), m in zip(every, [m for m in limits for _ in range(S)]))
    for k in (3, 8, 100):
        other = run(k)
        assert [t for t, _ in other] == [t for t, _ in every]
        assert [lp for _, lp in other] == pytest.approx([lp for _, lp in every], abs=1e-5)
    with pytest.raises(ValueError, match="check_every must be >= 1, got 0"):
        run(0)


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@pytest.mark.parametrize("temperature, prompts", [(0.0, QUESTIONS), (1.0, QUESTIONS), (1.0, ["Hi", "Yo"])])
def test_decode_steps_read_nothing_back_between_checks(monkeypatch, tiny, temperature, prompts):
    """Each tensor read on the host (a host sync on a GPU) during decode_batch is counted. With finished rows
    looked for every k steps (the GPU default) a decode reads a fixed few times plus a few per look, not once
    per step: no ``done.any()`` per step in our loop, and no ``padding_mask.all()`` per step in transformers'
    mask building (the one-token steps get no mask, or the mask ready-made). Left-padded prompts and prompts
    of one length (no padding) both; with looks at every step the count grows with the steps."""
    from opr.generation import decode_batch, encode_prompts

    encoded = encode_prompts(tiny, [tiny.format_prompt(q, True) for q in prompts])
    assert (len({len(e) for e in encoded}) > 1) == (prompts is QUESTIONS)
    steps, k = 24, 8

    def reads(check_every: int) -> int:
        cfg = SamplingConfig(max_new_tokens=steps, temperature=temperature, num_samples=1 if temperature == 0 else 2)
        gens = None if temperature == 0 else [torch.Generator().manual_seed(r) for r in range(2 * len(encoded))]
        count = {"n": 0}
        def counted(original):
            def read(*args, **kwargs):
                count["n"] += 1
                return original(*args, **kwargs)
            return read

        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        try:
            with torch.no_grad():  # an EOS id never sampled: every row runs all the steps
                out = decode_batch(tiny.model, encoded, cfg, [10**6], tiny.tokenizer.pad_token_id, gens,
                                   check_every=check_every)
        finally:
            monkeypatch.undo()
        assert all(len(t) == steps for t, _ in out)
        return count["n"]

    assert reads(k) <= 4 + 2 * (steps // k)  # prefill mask, the looks, the answers read at the end
    assert reads(1) >= steps  # a look at every step reads at every step: the counter sees the reads


def test_own_decode_mask_only_for_full_attention_sdpa(tiny):
    from opr.generation import builds_own_decode_mask

    assert builds_own_decode_mask(tiny.model)  # opr_sdpa, full attention
    cfg = tiny.model.config
    for attr, value in (("_attn_implementation", "eager"), ("sliding_window", 16),
                        ("layer_types", ["full_attention", "sliding_attention"])):
        model = type("M", (), {"config": type("C", (), {**{a: getattr(cfg, a, None) for a in
                               ("_attn_implementation", "sliding_window", "layer_types")}, attr: value})})()
        assert not builds_own_decode_mask(model), attr
