"""Batched generation (opr/generation.py): greedy outputs equal transformers' ``generate``, results come back
in input order, finished rows leave the batch without changing the others, sampling is seeded per row."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from opr.backbones import load_tiny
from opr.generation import SamplingConfig, generate, length_sorted_batches, process_logits

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


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def tiny_eos():
    """The tiny model with a frequent output character as EOS, so that rows finish at different steps."""
    bb = load_tiny()
    prompts = [bb.format_prompt(q, True) for q in QUESTIONS]
    outs = generate(bb, prompts, SamplingConfig(max_new_tokens=12), desc=False)
    text = "".join(g[0].text for g in outs)
    bb.tokenizer.eos_token = max(set(text), key=text.count)
    return bb


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_greedy_equals_hf_generate(tiny, batch_size):
    prompts = [tiny.format_prompt(q, True) for q in QUESTIONS]
    outs = generate(tiny, prompts, SamplingConfig(max_new_tokens=16, batch_size=batch_size), desc=False)
    assert len(outs) == len(prompts)
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
    long = tiny.format_prompt(QUESTIONS[2], True)
    tail = long[-20:]  # the tiny tokenizer has one token per character
    cut = generate(tiny, [long], SamplingConfig(max_new_tokens=8), max_prompt_tokens=20, desc=False)
    alone = generate(tiny, [tail], SamplingConfig(max_new_tokens=8), desc=False)
    full = generate(tiny, [long], SamplingConfig(max_new_tokens=8), desc=False)
    assert cut[0][0] == alone[0][0]
    assert cut[0][0].text != full[0][0].text
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        generate(tiny, [long], SamplingConfig(), max_prompt_tokens=0)


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
    assert a == b
    # a prompt's samples depend on its position in the list, not on its batch neighbours
    alone = generate(bb, prompts[:1], cfg, seed=7, desc=False)
    assert alone[0] == a[0]
    # different seed or sample index: different text (a random model samples widely)
    c = generate(bb, prompts, cfg, seed=8, desc=False)
    assert [g.text for gens in a for g in gens] != [g.text for gens in c for g in gens]
    assert len({g.text for g in a[2]}) > 1


def test_process_logits_matches_hf_warpers():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for temperature, top_p in [(0.7, 0.9), (1.0, 0.5), (1.3, 1.0), (0.5, 0.05)]:
        ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone())) \
            if top_p < 1 else TemperatureLogitsWarper(temperature)(None, logits.clone())
        ours = process_logits(logits, temperature, top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        assert torch.allclose(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])
    assert torch.equal(process_logits(logits, 0.0, 0.5), logits)


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
