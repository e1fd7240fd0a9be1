"""Write a tiny llama-architecture GGUF model that llama.cpp loads and streams tokens from.

Run with the Python that has the ``gguf`` package (hack/llama.sh's venv), not the project's:
``python tinymodel.py OUT.gguf``. Standard library, numpy and gguf only, so it runs as a plain script.

The model is a real llama graph (2 layers, 64 dims, 4 heads) with a sentencepiece ("llama") vocabulary:
the three special tokens, the 256 byte-fallback tokens (llama.cpp's tokenizer needs them for any byte it
cannot otherwise spell), single characters (so any prompt tokenizes) and a few words. Its weights are
chosen, not trained: attention and feed-forward weights are zero, so the last hidden state is that
token's embedding (all ones); the output matrix gives every word token the same logit and every other
token a very low one. Sampling therefore picks words at random and never ends early: the text is
gibberish made of real words, and a reply runs to ``max_tokens``, which is what a streaming test needs.
"""

from __future__ import annotations

import string
import sys

import gguf  # type: ignore[import-not-found,unused-ignore]
import numpy as np

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
N_CTX = 512
WORDS = [
    "hello",
    "world",
    "stream",
    "queue",
    "token",
    "reply",
    "chunk",
    "model",
    "redis",
    "worker",
    "fast",
    "small",
    "tiny",
    "answer",
    "user",
    "message",
    "time",
    "river",
    "stone",
    "cloud",
    "light",
    "green",
    "blue",
    "red",
    "quiet",
    "bright",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def vocabulary() -> tuple[list[str], list[float], list[int], list[int]]:
    """Tokens, scores, token types, and the indices of the word tokens (the only ones sampled)."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    singles = ["\u2581", *string.ascii_letters, *string.digits, *string.punctuation]
    tokens += singles
    types += [T.NORMAL] * len(singles)
    first_word = len(tokens)
    tokens += ["\u2581" + w for w in WORDS]
    types += [T.NORMAL] * len(WORDS)
    scores = [0.0] * len(tokens)
    for i in range(first_word, len(tokens)):
        scores[i] = float(len(tokens[i]))  # longer pieces merge first
    return tokens, scores, [int(t) for t in types], list(range(first_word, len(tokens)))


def write(path: str) -> None:
    tokens, scores, types, words = vocabulary()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("streamqueue-tiny")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    f32 = np.float32
    w.add_tensor("token_embd.weight", np.ones((n_vocab, N_EMBD), dtype=f32))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=f32))
    output = np.full((n_vocab, N_EMBD), -1.0, dtype=f32)  # logit -64 for all but the words
    output[words] = 0.0
    w.add_tensor("output.weight", output)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=f32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=f32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.zeros((N_EMBD, N_EMBD), dtype=f32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", np.zeros((N_FF, N_EMBD), dtype=f32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((N_FF, N_EMBD), dtype=f32))
        w.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((N_EMBD, N_FF), dtype=f32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tinymodel.py OUT.gguf")
    write(sys.argv[1])
