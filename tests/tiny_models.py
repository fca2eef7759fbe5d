"""The tiny model configs of the tests and the benchmarks, in one place: random models built
locally from configs (no downloads), with fixed seeds.

- `make_tokenizer()`, `make_config(arch, tokenizer)`, `build_model(arch, tokenizer)`: the seven
  architectures the engine supports, 2 blocks of hidden size 32, for engine tests;
- `BENCH_LLAMA` / `BENCH_LLAMA_2_LAYERS`: the larger tiny Llamas the benchmarks time
  (`bench/attribution.py --tiny`, `bench/gpu_attribution.py --tiny`); `DISTRIBUTED_LLAMA`, the
  distributed tests' (`random_llama(config, seed)` builds any of them with larger weights);
- `UNSUPPORTED`: configs of architectures the engine refuses (encoder-decoder, encoder-only).

The benchmarks import this module from the repo root (`from tests.tiny_models import ...`).
"""

from __future__ import annotations

from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox")
# Architectures saved with tied input/output embeddings.
TIED_ARCHS = frozenset({"llama", "gpt2", "gemma"})

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

HIDDEN = 32
INTERMEDIATE = 64
HEADS = 4
LAYERS = 2
MAX_POSITIONS = 256


def make_tokenizer(chat_template: bool = True) -> Any:
    """A byte-level BPE tokenizer with the 256 byte tokens, no merges, and 5 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_config(arch: str, tokenizer: Any) -> Any:
    """A tiny config: 2 blocks, hidden 32, vocab = the tokenizer's size."""
    import transformers as tf

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=arch in TIED_ARCHS,
        **ids,
    )
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)  # q/k/v have biases: out of scope
    if arch == "gemma":
        return tf.GemmaConfig(**llama_like, head_dim=HIDDEN // HEADS)
    if arch == "phi3":
        # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**llama_like)
    if arch == "gpt2":
        # Conv1D (transposed linear) layers
        return tf.GPT2Config(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            tie_word_embeddings=True,
            **ids,
        )
    if arch == "gpt_neox":
        # the same names, but no grouped-query attention
        return tf.GPTNeoXConfig(
            **{k: v for k, v in llama_like.items() if k != "num_key_value_heads"}
        )
    raise ValueError(f"unknown arch {arch}")


def build_model(arch: str, tokenizer: Any, seed: int = 1234) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, tokenizer), dtype=torch.float32)
    return with_larger_weights(model)


def with_larger_weights(model: Any, std: float = 0.2) -> Any:
    """`model` in eval mode with its matrices drawn again from N(0, std) off the global torch
    generator: from_config initialises with a small std, and larger (deterministic) weights
    keep gradients and scores far from float noise."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def random_llama(config: dict[str, Any], seed: int, std: float = 0.2) -> Any:
    """The Llama of one of the config dicts below, seeded, with larger weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return with_larger_weights(AutoModelForCausalLM.from_config(llama_config(config)), std)


def llama_config(base: dict[str, Any], **overrides: Any) -> Any:
    """A `LlamaConfig` from one of the dicts below, with `overrides`."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**base, **overrides})


# The benchmarks' tiny Llama (seconds on a CPU): larger than the tests' so timings mean something.
BENCH_LLAMA: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
BENCH_LLAMA_2_LAYERS: dict[str, Any] = {
    **BENCH_LLAMA,
    "num_hidden_layers": 2,
    "tie_word_embeddings": False,
}
# The distributed tests' tiny Llama: intermediate size 51 splits gate/up unevenly across 2 ranks
# (26/25 rows), and tied embeddings give the root shard a shared weight.
DISTRIBUTED_LLAMA: dict[str, Any] = BENCH_LLAMA | {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 51,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def t5_config() -> Any:
    from transformers import T5Config

    return T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)


def bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )


# Refused architectures: (config factory, what the refusal must say).
UNSUPPORTED: dict[str, tuple[Any, list[str]]] = {
    "t5": (t5_config, ["unsupported architecture 't5'", "encoder-decoder"]),
    "bert": (bert_config, ["unsupported architecture 'bert'", "encoder-only"]),
}


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not take `logits_to_keep` (custom code, adapters): the
    full-logits path of `attribution.scored_logits` and the dissociation probe."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Any, attention_mask: Any = None, use_cache: bool = False) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
