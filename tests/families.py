"""Small random models of the Qwen2, Qwen3 and Llama-3 architectures with in-memory tokenizers that carry
those families' special tokens and chat-template forms (no download), for tests/test_family_*.py.

A family folder is written the way the hub's are (config.json, generation_config.json with the family's
list of EOS ids, tokenizer files) and loaded through :func:`opr.backbones.load_pretrained`, the loader of the
``qwen2_5_7b_instruct``, ``qwen3_8b`` and ``llama3_1_8b_instruct`` presets. The tokenizers are character
level (one token per printable ASCII character) with the family's special tokens after them; the chat
templates are short templates of the family's form, written here.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from conftest import clear_launch_env
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from opr.backbones import Backbone, load_pretrained
from opr.generation import SamplingConfig, generate
from opr.types import Example, Task

CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]

# Qwen2.5-Instruct's form: a default system line when none is given, ChatML turns.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Qwen3's form: ChatML turns; with enable_thinking=false the answer cue carries an empty think block.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

# Llama-3.1-Instruct's form: the template writes the BOS itself, then header-delimited turns.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' + system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    """What a family's folder holds: its special tokens, which of them are BOS / EOS / pad for the tokenizer,
    the ids its ``generation_config.json`` stops at, and its chat template."""

    name: str
    architecture: str  # Qwen2 | Qwen3 | Llama
    specials: tuple[str, ...]
    bos: Optional[str]
    eos: str
    pad: Optional[str]
    generation_eos: tuple[str, ...]
    template: str
    adds_bos: bool = False  # the tokenizer puts its BOS first by default (Llama-3's post-processor)


QWEN2 = Family("qwen2_5_7b_instruct", "Qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
               "<|im_end|>", "<|endoftext|>", ("<|im_end|>", "<|endoftext|>"), QWEN2_TEMPLATE)
QWEN3 = Family("qwen3_8b", "Qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"), None,
               "<|im_end|>", "<|endoftext|>", ("<|im_end|>", "<|endoftext|>"), QWEN3_TEMPLATE)
LLAMA3 = Family("llama3_1_8b_instruct", "Llama",
                ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>",
                 "<|end_header_id|>"),
                "<|begin_of_text|>", "<|eot_id|>", None, ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                LLAMA3_TEMPLATE, adds_bos=True)


def build_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """The family's tokenizer in memory: printable ASCII characters, then its special tokens."""
    vocab = {t: i for i, t in enumerate(CHARS + list(family.specials))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    if family.adds_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, vocab[family.bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=family.bos, eos_token=family.eos,
                                  pad_token=family.pad, additional_special_tokens=list(family.specials))
    tok.chat_template = family.template
    return tok


def build_model(family: Family, tok, seed: int = 0) -> torch.nn.Module:
    """A random model of the family's architecture, 2 layers of width 64, with the family's generation_config
    (its list of EOS ids, pad, BOS)."""
    import transformers

    config_class = getattr(transformers, f"{family.architecture}Config")
    model_class = getattr(transformers, f"{family.architecture}ForCausalLM")
    ids = tok.convert_tokens_to_ids
    config = config_class(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None if family.bos is None else ids(family.bos), eos_token_id=ids(family.eos),
        pad_token_id=None if family.pad is None else ids(family.pad),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=[ids(t) for t in family.generation_eos],
        pad_token_id=config.pad_token_id)
    return model.eval()


@torch.no_grad()
def force_greedy(model: torch.nn.Module, token_id: int) -> None:
    """Make ``token_id`` the model's only greedy token, whatever the input: hidden dimension 0 is 1 in every
    embedding and no layer writes to it, so after the final norm it is positive at every position; the output
    row of ``token_id`` reads only that dimension, 1000-fold."""
    model.model.embed_tokens.weight[:, 0] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0, :] = 0.0
        layer.mlp.down_proj.weight[0, :] = 0.0
    model.lm_head.weight[token_id] = 0.0
    model.lm_head.weight[token_id, 0] = 1000.0


def write_folder(family: Family, root: Path, greedy_token: Optional[str] = None, seed: int = 0) -> Path:
    """A hub-style folder of the family at ``root``; ``greedy_token``: the model's only greedy token."""
    tok = build_tokenizer(family)
    model = build_model(family, tok, seed)
    if greedy_token is not None:
        force_greedy(model, tok.convert_tokens_to_ids(greedy_token))
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def load_family(family: Family, root: Path, greedy_token: Optional[str] = None, **options) -> Backbone:
    """The family's folder written at ``root`` and loaded as its preset loads it."""
    return load_pretrained(family.name, str(write_folder(family, root, greedy_token)), **options)


def hf_generate(bb: Backbone, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy ``model.generate`` on one prompt's ids (no padding), with the model's own generation_config
    (its EOS list): the new tokens, the EOS that ended them included."""
    x = torch.tensor([list(ids)])
    out = bb.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, x.shape[1]:].tolist()


def cut_at_eos(new: list[int], eos: Sequence[int]) -> tuple[list[int], bool]:
    """``model.generate``'s new tokens -> (tokens before the first EOS, whether an EOS ended them)."""
    for k, t in enumerate(new):
        if t in eos:
            return new[:k], True
    return new, False


def echo_task(name: str, chat: bool, max_new_tokens: int) -> Task:
    """A task whose reward is 100 for an empty answer (the forced models answer nothing)."""
    ex = Example(f"{name}/0", name, "Say nothing.", "")
    return Task(name, train=[ex], eval=[ex], reward=lambda text, e: 100.0 * (text == ""), chat=chat,
                max_new_tokens=max_new_tokens)


def vllm_stand_in(monkeypatch) -> dict:
    """A stand-in ``vllm`` module that decodes greedily with a torch model built from the config of the folder it
    is given (``load_format="dummy"``: random weights, as the backend asks) and loaded through the engine model's
    ``load_weights`` (as the backend copies the trainer's weights in), stopping only at the tokenizer's EOS and at
    the request's ``stop_token_ids``; like vLLM, a completion's ``token_ids`` end with the stop token that ended
    it and its text has special tokens stripped."""
    calls: dict = {"params": [], "loaded": 0}

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class EngineModel:
        def __init__(self, model):
            self.model = model

        @torch.no_grad()
        def load_weights(self, weights):
            params = dict(self.model.named_parameters())
            for name, tensor in weights:
                params[name].copy_(tensor)
            calls["loaded"] += 1

    class LLM:
        def __init__(self, model, tokenizer, **kw):
            from transformers import AutoConfig, AutoTokenizer

            assert kw.get("load_format") == "dummy" and not list(Path(model).glob("*.safetensors"))
            self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).eval()
            self.tok = AutoTokenizer.from_pretrained(tokenizer)
            engine_model = EngineModel(self.model)
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=engine_model))))

        def sleep(self, level=1):
            pass

        def wake_up(self, tags=None):
            pass

        def reset_prefix_cache(self):
            pass

        @torch.no_grad()
        def generate(self, requests, params, use_tqdm=True):
            outs = []
            for req, p in zip(requests, params):
                calls["params"].append(p)
                stops = {self.tok.eos_token_id, *(getattr(p, "stop_token_ids", None) or [])}
                ids = list(req["prompt_token_ids"])
                new: list[int] = []
                lp = 0.0
                while len(new) < p.max_tokens:
                    logits = self.model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1]
                    t = int(logits.argmax())
                    lp += float(logits.log_softmax(-1)[t])
                    new.append(t)
                    if t in stops:
                        break
                text = self.tok.decode(new, skip_special_tokens=True)
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(
                    token_ids=new, text=text, cumulative_logprob=lp)]))
            return outs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    clear_launch_env(monkeypatch)  # the backend sets the launcher's variables; put back as they were afterwards
    return calls


def greedy(bb: Backbone, prompts: Sequence[str], limit: int) -> list:
    return [g[0] for g in generate(bb, list(prompts), SamplingConfig(max_new_tokens=limit, batch_size=8), desc=False)]


def assert_vllm_stops_at_once_as_the_builtin_loop(bb: Backbone, prompts: Sequence[str], limit: int,
                                                  monkeypatch) -> dict:
    """``bb`` (a model whose only greedy token is one of its EOS ids) through the vLLM stand-in and the built-in
    loop: both end every row at once (empty answers, 0 tokens) and every vLLM request carries ``bb.eos_ids``
    as stop tokens. Returns the stand-in's record of the calls."""
    from opr.generation_vllm import VLLMBackend

    calls = vllm_stand_in(monkeypatch)
    builtin = greedy(bb, prompts, limit)
    bb.generation_backend = VLLMBackend()
    try:
        served = greedy(bb, prompts, limit)
    finally:
        bb.generation_backend.close()
        bb.generation_backend = None
    rows = [[(g.text, g.num_tokens, g.token_ids) for g in gens] for gens in (served, builtin)]
    assert rows[0] == rows[1] == [("", 0, ())] * len(prompts)
    assert calls["params"] and all(list(p.stop_token_ids) == list(bb.eos_ids) for p in calls["params"])
    assert calls["loaded"] == 1  # the trainer's weights, copied in once
    return calls


__all__ = ["QWEN2", "QWEN3", "LLAMA3", "Family", "build_tokenizer", "build_model", "force_greedy", "write_folder",
           "load_family", "hf_generate", "cut_at_eos", "echo_task", "vllm_stand_in", "greedy",
           "assert_vllm_stops_at_once_as_the_builtin_loop"]
