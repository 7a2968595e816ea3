"""Tiny llama GGUF files written with llama.cpp's own writer (the gguf package), for tests.

    write_gguf(path, tensor_type="F32", vocab="gpt2", tied=False, seed=0, **options) -> Written

Every 2-D weight is stored in `tensor_type` (the norms in F32, as llama.cpp does); quantized ones
by gguf.quants.quantize, K-quants as random blocks with sane scales (the package cannot quantize
to them). The vocabulary is real: a byte-level BPE trained here with `tokenizers` ("gpt2"), or
the SentencePiece model of checkpoints.make_tokenizer ("llama"). The names map to Meta's by a
table of this file's own, so a wrong table in formats/gguf.py cannot pass by agreeing with it.
"""

import json
import os
from typing import NamedTuple

import numpy as np

import gguf
from helpers import CHATML

# Control tokens first (ids 0-2), then a user-defined one, as in SmolLM's and Qwen's vocabularies.
BPE_SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4)]
BPE_TEXT = """\
The quick brown fox jumps over the lazy dog. Don't you think it's a lovely day?
Café, naïve, façade, déjà vu: accents are letters too. Ærøskøbing and Straße.
日本語のテキストと中文字符, 한국어 문장, and emoji like 🙂 and 👍 appear in chats.
def main():\n    return {"answer": 42, "items": [1, 2, 3]}\n
Numbers: 12345, 3.14159, 2024-01-01, 1000000 and 7 o'clock.
<|im_start|>user\nWhat is MLX?<|im_end|>\n<|im_start|>assistant\nAn array framework.<|im_end|>
"""
GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "output.weight": "output.weight"}
LAYER_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
# Where the float16 scales of a K-quant block lie, so random blocks get finite, small ones.
K_QUANT_SCALES = {"Q4_K": slice(0, 4), "Q6_K": slice(208, 210)}


class Written(NamedTuple):
    path: str
    config: dict    # what Checkpoint.config must say
    weights: dict   # {Meta name: float32 array} before quantization
    stored: dict    # {Meta name: (GGUF name, numpy array exactly as written, ggml type)}
    tokenizer: object  # the gpt2 vocabulary's tokenizers.Tokenizer, or the llama one's tokenizer.model path


def gguf_name(name):
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, layer, *module, _ = name.split(".")
    return f"blk.{layer}.{LAYER_NAMES['.'.join(module)]}.weight"


def weight_shapes(dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size, tied):
    """{Meta name: numpy shape} of every weight, in the order llama.cpp writes them."""
    head_dim = dim // n_heads
    shapes = {"tok_embeddings.weight": (vocab_size, dim), "norm.weight": (dim,)}
    if not tied:
        shapes["output.weight"] = (vocab_size, dim)
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (n_heads * head_dim, dim),
                       p + "attention.wk.weight": (n_kv_heads * head_dim, dim),
                       p + "attention.wv.weight": (n_kv_heads * head_dim, dim),
                       p + "attention.wo.weight": (dim, n_heads * head_dim),
                       p + "feed_forward.w1.weight": (hidden_dim, dim),
                       p + "feed_forward.w2.weight": (dim, hidden_dim),
                       p + "feed_forward.w3.weight": (hidden_dim, dim),
                       p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,)})
    return shapes


_BPE_CACHE = {}


def byte_level_vocab(vocab_size=320):
    """(tokens, token types, merges, tokenizer) of a byte-level BPE trained on BPE_TEXT."""
    if vocab_size not in _BPE_CACHE:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[t for t, _ in BPE_SPECIALS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(BPE_TEXT.splitlines() * 4, trainer)
        model = json.loads(tokenizer.to_str())["model"]
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        assert [model["vocab"][t] for t in tokens] == list(range(len(tokens)))
        types = [dict(BPE_SPECIALS).get(t, 1) for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        _BPE_CACHE[vocab_size] = tokens, types, merges, tokenizer
    return _BPE_CACHE[vocab_size]


def sentencepiece_vocab(folder, path=None):
    """(pieces, scores, types, tokenizer.model path) of a SentencePiece model, by default
    checkpoints.make_tokenizer's, as llama.cpp's converter lists them."""
    import sentencepiece as spm

    from checkpoints import make_tokenizer

    path = path or make_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=path)
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    scores = [sp.get_score(i) for i in range(sp.vocab_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             5 if sp.is_unused(i) else 1 for i in range(sp.vocab_size())]
    return pieces, scores, types, path


def stored_form(array, tensor_type, rng):
    """The array as the file holds it: (numpy data for GGUFWriter, ggml type)."""
    qtype = gguf.GGMLQuantizationType[tensor_type]
    if tensor_type in K_QUANT_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (array.shape[0], array.shape[1] // block, size), dtype=np.uint8)
        where = K_QUANT_SCALES[tensor_type]
        scales = rng.uniform(1e-3, 1e-2, raw.shape[:-1] + ((where.stop - where.start) // 2,))
        raw[..., where] = scales.astype(np.float16).view(np.uint8)
        return raw.reshape(array.shape[0], -1), qtype
    if tensor_type == "F32":
        return array, qtype
    if tensor_type == "F16":
        return array.astype(np.float16), qtype
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(path, tensor_type="F32", vocab="gpt2", tied=False, seed=0, dim=64, n_layers=2, n_heads=4,
               n_kv_heads=2, hidden_dim=128, context_length=256, rope_theta=10000.0, norm_eps=1e-5,
               pre="llama-bpe", spm_model=None, drop=(), rope_freqs=None, metadata=None, weight_std=0.05):
    """Write a tiny llama GGUF at `path` and return what it holds (Written).

    spm_model: the llama vocabulary's SentencePiece model file (default: a tiny one trained here);
    drop: GGUF tensor names left out; rope_freqs: float32 values of a rope_freqs.weight tensor;
    metadata: {key: (value, GGUFValueType)} written besides (or instead of) the usual keys;
    weight_std: the spread of the 2-D weights (0.3 keeps a tiny model's activations O(1))."""
    rng = np.random.default_rng(seed)
    if vocab == "gpt2":
        tokens, types, merges, tokenizer = byte_level_vocab()
        scores = None
    else:
        tokens, scores, types, tokenizer = sentencepiece_vocab(os.path.join(os.path.dirname(path), "spm"), spm_model)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(context_length)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden_dim)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(norm_eps)
    writer.add_rope_dimension_count(dim // n_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if vocab == "gpt2":
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_eot_token_id(0)
    else:
        writer.add_token_scores(scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    writer.add_chat_template(CHATML)
    for key, (value, vtype) in (metadata or {}).items():
        writer.add_key_value(key, value, vtype)
    weights, stored = {}, {}
    shapes = weight_shapes(dim, n_layers, n_heads, n_kv_heads, hidden_dim, len(tokens), tied)
    for name, shape in shapes.items():
        array = (rng.standard_normal(shape) * (0.5 if len(shape) == 1 else weight_std)).astype(np.float32)
        data, qtype = stored_form(array, "F32" if len(shape) == 1 else tensor_type, rng)
        if gguf_name(name) in drop:
            continue
        weights[name], stored[name] = array, (gguf_name(name), data, qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "head_dim": dim // n_heads, "hidden_dim": hidden_dim, "norm_eps": norm_eps, "vocab_size": len(tokens),
              "rope_theta": rope_theta, "sliding_window": None, "tie_word_embeddings": tied,
              "context_length": context_length, "bos_token_id": 1,
              "eos_token_ids": [2, 0] if vocab == "gpt2" else [2],
              "add_bos_token": vocab == "llama" or pre in ("llama-bpe", "llama3")}
    return Written(str(path), config, weights, stored, tokenizer)
