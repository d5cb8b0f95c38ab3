"""The Llama-3 family (``llama3_1_8b_instruct``) decoded as its authors decode it, on a small random Llama
model with an in-memory tokenizer of Llama-3.1's special tokens, a post-processor that puts
``<|begin_of_text|>`` first (as Llama-3's does) and a header-style chat template that writes the BOS itself
(tests/families.py).

Llama-3.1-Instruct's generation_config stops at ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``; its
tokenizer has no pad token. Raw prompts (TRACE's ``chat: false``) get the BOS in training, generation and
rollouts alike, chat prompts keep the template's one."""

from __future__ import annotations

import pytest
import torch
from families import (
    LLAMA3,
    assert_vllm_stops_at_once_as_the_builtin_loop,
    cut_at_eos,
    echo_task,
    greedy,
    hf_generate,
    load_family,
)

from opr.engine.torch_engine import TorchTrainer
from opr.generation import encode_prompts
from opr.rollout import encode_response, sample_rollouts
from opr.types import SFTExample

PROMPTS = ["Hello there", "What is 2+2? Explain, and then explain once more.", "x"]
LIMIT = 6


@pytest.fixture(scope="module")
def stops_at_eom(tmp_path_factory):
    """A Llama-3 model whose only greedy token is <|eom_id|> (in generation_config, not the tokenizer's EOS)."""
    return load_family(LLAMA3, tmp_path_factory.mktemp("llama3") / "eom", greedy_token="<|eom_id|>")


@pytest.fixture(scope="module")
def random_llama3(tmp_path_factory):
    return load_family(LLAMA3, tmp_path_factory.mktemp("llama3") / "random")


def test_folder_is_the_family_and_pads_with_eos(stops_at_eom):
    bb, tok = stops_at_eom, stops_at_eom.tokenizer
    eot, eom, end = tok.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
    assert type(bb.model).__name__ == "LlamaForCausalLM"
    assert bb.model.generation_config.eos_token_id == [end, eom, eot] and bb.eos_ids == (eot, end, eom)
    # no pad token of its own: EOS pads, on the left for generation
    assert tok.pad_token == "<|eot_id|>" and tok.padding_side == "left"
    assert bb.model.generation_config.pad_token_id == eot


@pytest.mark.parametrize("chat", [False, True])
def test_stops_at_once_like_generate_when_the_greedy_token_is_eom(stops_at_eom, chat):
    bb = stops_at_eom
    prompts = [bb.format_prompt(p, chat) for p in PROMPTS]
    eom = bb.tokenizer.convert_tokens_to_ids("<|eom_id|>")
    for prompt, g in zip(prompts, greedy(bb, prompts, LIMIT)):
        new = hf_generate(bb, bb.encode_prompt(prompt), LIMIT)
        assert new == [eom]
        tokens, finished = cut_at_eos(new, bb.model.generation_config.eos_token_id)
        assert (list(g.token_ids), g.num_tokens < LIMIT, g.text) == (tokens, finished, "") == ([], True, "")
    task = echo_task("t", chat=chat, max_new_tokens=LIMIT)
    [[r]] = sample_rollouts(bb, task.eval, {"t": task})
    assert r.finished and r.token_ids == ()


@pytest.mark.parametrize("chat", [False, True])
def test_random_model_batched_greedy_equals_generate(random_llama3, chat):
    """Prompts of different lengths in one batch, left-padded with <|eot_id|>; each alone through
    ``model.generate`` from the ids TRACE's default encoding gives (BOS first)."""
    bb = random_llama3
    prompts = [bb.format_prompt(p, chat) for p in PROMPTS]
    for prompt, g in zip(prompts, greedy(bb, prompts, 10)):
        ids = bb.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        tokens, finished = cut_at_eos(hf_generate(bb, ids, 10), bb.model.generation_config.eos_token_id)
        assert (list(g.token_ids), g.num_tokens < 10) == (tokens, finished)


def _encodings(bb, text: str, chat: bool, max_length: int = 256) -> dict[str, list[int]]:
    """The prompt ids of one example as training, generation and a rollout's replay encode them."""
    trainer = TorchTrainer(bb, max_length=max_length)
    prompt = bb.format_prompt(text, chat)
    return {
        "training": trainer.tokenize(SFTExample(text, "ok", "t", chat=chat))[0],
        "generation": encode_prompts(bb, [prompt])[0],
        "rollout": encode_response(bb.tokenizer, prompt, "ok", True, max_length, (40,))[0],
    }


def test_raw_prompts_get_one_bos_everywhere_chat_prompts_keep_the_templates(random_llama3):
    bb, tok = random_llama3, random_llama3.tokenizer
    bos = tok.bos_token_id
    raw = _encodings(bb, "Translate: Hallo", chat=False)
    assert raw["training"] == raw["generation"] == raw["rollout"] == tok("Translate: Hallo")["input_ids"]
    assert raw["training"][0] == bos and raw["training"].count(bos) == 1
    chat = _encodings(bb, "Translate: Hallo", chat=True)
    assert chat["training"] == chat["generation"] == chat["rollout"]
    assert chat["training"][0] == bos and chat["training"].count(bos) == 1  # the template's, not a second


def test_prompts_cut_on_the_left_keep_their_bos(random_llama3):
    bb, bos = random_llama3, random_llama3.tokenizer.bos_token_id
    text = "A long raw prompt that will not fit."
    full = bb.encode_prompt(text)
    cut = encode_prompts(bb, [text], max_prompt_tokens=8)[0]
    assert cut == [bos] + full[-7:]
    short = _encodings(bb, text, chat=False, max_length=10)
    assert short["training"] == [bos] + full[-6:]  # room for 7 prompt tokens beside "o", "k", EOS
    assert short["rollout"] == [bos] + full[-7:]  # beside the sampled token and EOS


def test_generation_feeds_the_bos_to_the_model(random_llama3):
    """The answer to a raw prompt is the model's answer after <|begin_of_text|>, not without it."""
    bb = random_llama3
    with torch.no_grad():
        with_bos = hf_generate(bb, bb.tokenizer("x")["input_ids"], 8)
        without = hf_generate(bb, bb.tokenizer("x", add_special_tokens=False)["input_ids"], 8)
    assert with_bos != without  # the test can tell the two apart
    assert list(greedy(bb, ["x"], 8)[0].token_ids) == cut_at_eos(with_bos, bb.eos_ids)[0]


def test_vllm_backend_ends_the_same_rows(stops_at_eom, monkeypatch):
    bb = stops_at_eom
    calls = assert_vllm_stops_at_once_as_the_builtin_loop(bb, [bb.format_prompt(p, False) for p in PROMPTS], LIMIT,
                                                          monkeypatch)
    assert all(len(p.stop_token_ids) == 3 for p in calls["params"])
