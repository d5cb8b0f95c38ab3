"""The Qwen3 family (``qwen3_8b``) decoded as its authors decode it, on a small random Qwen3 model with an
in-memory tokenizer of Qwen3's special tokens and a ChatML template that honours ``enable_thinking``
(tests/families.py); the preset's ``chat_template_kwargs: {enable_thinking: false}`` reaches the template."""

from __future__ import annotations

import pytest
from conftest import TINY, compose_cfg
from families import QWEN3, cut_at_eos, echo_task, greedy, hf_generate, load_family, write_folder

from opr.config import ConfigError, build, validate
from opr.generation import encode_prompts
from opr.rollout import sample_rollouts

PROMPTS = ["Hello there", "Name three colours, then three more.", "x"]
LIMIT = 5


@pytest.fixture(scope="module")
def stops_at_endoftext(tmp_path_factory):
    return load_family(QWEN3, tmp_path_factory.mktemp("qwen3") / "eot", greedy_token="<|endoftext|>")


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory):
    return write_folder(QWEN3, tmp_path_factory.mktemp("qwen3") / "random")


def test_folder_is_the_family(stops_at_endoftext):
    bb, tok = stops_at_endoftext, stops_at_endoftext.tokenizer
    eot, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert type(bb.model).__name__ == "Qwen3ForCausalLM"
    assert bb.eos_ids == (im_end, eot) and tok.bos_token is None
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"


@pytest.mark.parametrize("chat", [False, True])
def test_stops_at_once_like_generate_when_the_greedy_token_is_endoftext(stops_at_endoftext, chat):
    bb = stops_at_endoftext
    prompts = [bb.format_prompt(p, chat) for p in PROMPTS]
    for prompt, g in zip(prompts, greedy(bb, prompts, LIMIT)):
        tokens, finished = cut_at_eos(hf_generate(bb, bb.encode_prompt(prompt), LIMIT),
                                      bb.model.generation_config.eos_token_id)
        assert (list(g.token_ids), g.num_tokens < LIMIT) == (tokens, finished) == ([], True)
    task = echo_task("t", chat=chat, max_new_tokens=LIMIT)
    [[r]] = sample_rollouts(bb, task.eval, {"t": task})
    assert r.finished and r.token_ids == ()


def test_preset_turns_thinking_off_in_the_template(random_folder, tmp_path):
    cfg = validate(compose_cfg(TINY + ["backbone=qwen3_8b", f"backbone.path={random_folder}",
                                       "backbone.dtype=float32"], tmp_path))
    assert dict(cfg.backbone.chat_template_kwargs) == {"enable_thinking": False}
    bb = build(cfg.backbone, seed=0)
    text = bb.format_prompt("Hello", True)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    think, end = bb.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    ids = encode_prompts(bb, [text])[0]  # the think block reaches the model as Qwen3's special tokens
    assert ids.count(think) == ids.count(end) == 1 and ids.index(think) < ids.index(end)
    assert bb.format_conversation([("user", "a"), ("assistant", "b"), ("user", "a")], True).endswith(
        "<think>\n\n</think>\n\n")
    # without the option the template stays in thinking mode (no empty think block)
    plain = validate(compose_cfg(TINY + ["backbone=qwen3_8b", f"backbone.path={random_folder}",
                                         "backbone.chat_template_kwargs=null"], tmp_path))
    assert build(plain.backbone, seed=0).format_prompt("Hello", True).endswith("<|im_start|>assistant\n")


def test_chat_template_kwargs_must_be_a_mapping(random_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"chat_template_kwargs: Cannot assign str to Dict.*\(got 'off'\)"):
        validate(compose_cfg(TINY + ["backbone=qwen3_8b", f"backbone.path={random_folder}",
                                     "backbone.chat_template_kwargs=null", "backbone.chat_template_kwargs=off"],
                             tmp_path))


@pytest.mark.parametrize("chat", [False, True])
def test_random_model_batched_greedy_equals_generate(random_folder, chat):
    bb = load_family(QWEN3, random_folder.parent / "again", chat_template_kwargs={"enable_thinking": False})
    prompts = [bb.format_prompt(p, chat) for p in PROMPTS]
    for prompt, g in zip(prompts, greedy(bb, prompts, 10)):
        tokens, finished = cut_at_eos(hf_generate(bb, bb.encode_prompt(prompt), 10),
                                      bb.model.generation_config.eos_token_id)
        assert (list(g.token_ids), g.num_tokens < 10) == (tokens, finished)
