"""The Qwen2 family (``qwen2_5_7b_instruct``) decoded as its authors decode it, on a small random Qwen2 model
with an in-memory tokenizer of Qwen2.5's special tokens and a ChatML template (tests/families.py).

Qwen2.5-Instruct's tokenizer ends text with ``<|im_end|>``; its generation_config also stops at
``<|endoftext|>`` (its pad token), which the decode loop once ignored."""

from __future__ import annotations

import pytest
from families import (
    QWEN2,
    assert_vllm_stops_at_once_as_the_builtin_loop,
    cut_at_eos,
    echo_task,
    greedy,
    hf_generate,
    load_family,
)

from opr.rollout import encode_response, sample_rollouts

PROMPTS = ["Hello there", "What is 2+2? Explain, and then explain once more.", "x"]
LIMIT = 6


@pytest.fixture(scope="module")
def stops_at_endoftext(tmp_path_factory):
    """The issue's folder: a Qwen2 model whose only greedy token is <|endoftext|> (listed in its
    generation_config, not the tokenizer's EOS)."""
    return load_family(QWEN2, tmp_path_factory.mktemp("qwen2") / "eot", greedy_token="<|endoftext|>")


@pytest.fixture(scope="module")
def random_qwen2(tmp_path_factory):
    return load_family(QWEN2, tmp_path_factory.mktemp("qwen2") / "random")


def test_folder_is_the_family(stops_at_endoftext):
    bb, tok = stops_at_endoftext, stops_at_endoftext.tokenizer
    eot, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert type(bb.model).__name__ == "Qwen2ForCausalLM"
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None
    assert bb.model.generation_config.eos_token_id == [im_end, eot]
    assert bb.eos_ids == (im_end, eot)
    # pad: Qwen2.5's own <|endoftext|>, on the left for generation
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    assert bb.model.generation_config.pad_token_id == eot


@pytest.mark.parametrize("chat", [False, True])
def test_stops_at_once_like_generate_when_the_greedy_token_is_endoftext(stops_at_endoftext, chat):
    bb = stops_at_endoftext
    prompts = [bb.format_prompt(p, chat) for p in PROMPTS]
    eot = bb.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for prompt, g in zip(prompts, greedy(bb, prompts, LIMIT)):
        new = hf_generate(bb, bb.encode_prompt(prompt), LIMIT)
        assert new == [eot]  # model.generate honours generation_config's list: stops at once
        tokens, finished = cut_at_eos(new, bb.model.generation_config.eos_token_id)
        assert (list(g.token_ids), g.num_tokens < LIMIT, g.text) == (tokens, finished, "") == ([], True, "")


def test_rollout_is_finished_and_trained_with_the_tokenizers_eos(stops_at_endoftext):
    bb = stops_at_endoftext
    task = echo_task("t", chat=True, max_new_tokens=LIMIT)
    [[r]] = sample_rollouts(bb, task.eval, {"t": task})
    assert r.finished and r.token_ids == () and r.text == "" and r.reward == 100.0
    prompt, response = encode_response(bb.tokenizer, bb.format_prompt(task.eval[0].prompt, True), r.text,
                                       r.finished, 128, r.token_ids)
    assert response == [bb.tokenizer.eos_token_id]  # <|im_end|>, the end gold answers are trained with
    assert prompt == bb.encode_prompt(bb.format_prompt(task.eval[0].prompt, True))


@pytest.mark.parametrize("chat", [False, True])
def test_random_model_batched_greedy_equals_generate(random_qwen2, chat):
    bb = random_qwen2
    prompts = [bb.format_prompt(p, chat) for p in PROMPTS]  # different lengths: left padding with <|endoftext|>
    for prompt, g in zip(prompts, greedy(bb, prompts, 10)):
        tokens, finished = cut_at_eos(hf_generate(bb, bb.encode_prompt(prompt), 10),
                                      bb.model.generation_config.eos_token_id)
        assert (list(g.token_ids), g.num_tokens < 10) == (tokens, finished)


def test_no_bos_for_qwen(random_qwen2):
    """Qwen's tokenizers have no BOS: prompts are encoded as the tokenizer encodes them by default."""
    bb, tok = random_qwen2, random_qwen2.tokenizer
    for text in ["Hello", bb.format_prompt("Hello", True)]:
        assert bb.encode_prompt(text) == tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_vllm_backend_ends_the_same_rows(stops_at_endoftext, monkeypatch):
    """Both backends stop at <|endoftext|>: the same answers, token counts and finished flags; vLLM's
    request carries every id of Backbone.eos_ids as a stop token."""
    bb = stops_at_endoftext
    assert_vllm_stops_at_once_as_the_builtin_loop(bb, [bb.format_prompt(p, True) for p in PROMPTS], LIMIT,
                                                  monkeypatch)
