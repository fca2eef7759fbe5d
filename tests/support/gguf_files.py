"""A tiny GGUF file for tests: metadata and one tensor, written with the `gguf` package's own
writer (a real GGUF as llama.cpp tools write it), in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
# Parameters of the model it describes: tied embeddings (256 x 64), two llama blocks of hidden
# 64 (4 heads, 2 key-value heads of 16), MLP 128, and the final norm.
TINY_GGUF_PARAMETERS = 256 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64


def write_tiny_gguf(path: Path, chat_template: bool = True) -> Path:
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(256)
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)
    # no `output.weight`: the embeddings are tied
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
