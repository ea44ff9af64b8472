"""Writes a tiny llama-architecture GGUF with random weights for scripts/real-llama.sh.

Usage: python make_model.py LLAMA_CPP_DIR OUT.gguf

Two layers, n_embd 64, context 512: llama-server loads and runs it in milliseconds on a
CPU, so a real inference server counts real tokens behind the proxy. The tokenizer is
copied from the vocab-only GGUF the llama.cpp source ships (models/ggml-vocab-llama-spm
.gguf), plus a chat template, so chat requests go through the server's real template
and tokenizer path. The weights are random (seeded): the text is nonsense, the token
counts are real.
"""
import os
import sys

import numpy as np

llama_dir, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
import gguf  # noqa: E402  (the copy in the llama.cpp source tree)

vocab = gguf.GGUFReader(os.path.join(llama_dir, "models", "ggml-vocab-llama-spm.gguf"))


def field(name):
    f = vocab.fields[name]
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


tokens = field("tokenizer.ggml.tokens")
scores = field("tokenizer.ggml.scores")
types = field("tokenizer.ggml.token_type")
n_vocab, n_embd, n_ff, n_head, n_layer, n_ctx = len(tokens), 64, 128, 4, 2, 512

w = gguf.GGUFWriter(out, "llama")
w.add_name("llmproxy-tiny-random")
w.add_context_length(n_ctx)
w.add_embedding_length(n_embd)
w.add_block_count(n_layer)
w.add_feed_forward_length(n_ff)
w.add_head_count(n_head)
w.add_head_count_kv(n_head)
w.add_rope_dimension_count(n_embd // n_head)
w.add_layer_norm_rms_eps(1e-5)
w.add_file_type(gguf.LlamaFileType.ALL_F32)
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores(scores)
w.add_token_types(types)
w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
w.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
w.add_add_bos_token(True)
w.add_add_eos_token(False)
w.add_chat_template(
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

rng = np.random.default_rng(42)


def t(*shape):
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


w.add_tensor("token_embd.weight", t(n_vocab, n_embd))
w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
w.add_tensor("output.weight", t(n_vocab, n_embd))
for i in range(n_layer):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(p + name + ".weight", t(n_embd, n_embd))
    w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor(p + "ffn_gate.weight", t(n_ff, n_embd))
    w.add_tensor(p + "ffn_up.weight", t(n_ff, n_embd))
    w.add_tensor(p + "ffn_down.weight", t(n_embd, n_ff))

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"wrote {out}: vocab {n_vocab}, {n_layer} layers, n_embd {n_embd}")
