"""Tiny checkpoints in Meta's exact layout, and an independent reference forward.

Plain functions (not fixtures) for tests to import:

    make_tokenizer(folder, vocab_size=320)           -> path of folder/tokenizer.model
    make_checkpoint(folder, flavour="llama2", ...)   -> Checkpoint(state_dict, config, params)
    reference_logits(state_dict, config, tokens)     -> numpy float32 logits (B, T, V)

`reference_logits` follows Meta's llama/model.py (and Mistral's sliding window)
written from the semantics in torch; it deliberately shares no code with models.py.
"""

import io
import json
import math
import os
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "..", "shared", "assets")

FLAVOURS = ("llama1", "llama2", "mistral", "codellama")

# A small English text with some digits and punctuation, enough for a few
# hundred BPE merges. Every byte outside it still encodes through byte_fallback.
_TEXT = """\
Once upon a time, there was a little girl named Lily. She loved to play outside in the park.
One day, she saw a big, red ball under a tree. She ran to the ball and picked it up.
Her friend Tom came to play with her. They threw the ball high into the sky and laughed.
The sun was warm and the birds were singing in the trees. It was a happy day for everyone.
Then the wind started to blow, and dark clouds came over the hill. Lily was scared of the rain.
Tom said, "Don't worry, we can go to my house and play with my toys." Lily smiled and said yes.
At Tom's house, his mother gave them cookies and milk. The cookies were sweet and soft.
They built a tall tower with blocks, 12 blocks high, then 24, and it fell down with a crash.
Everyone laughed again. When the rain stopped, Lily went home and told her mom about her day.
Her mom hugged her and said, "I am glad you had fun with your friend." Lily went to bed happy.
The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill.
A small boat sailed across the lake at 7 o'clock in the morning; the water was calm and blue.
Learning to read takes time: first letters, then words, then whole sentences and stories.
The old man planted 3 apple trees, 5 pear trees and 10 rows of beans in his garden this spring.
"Where are you going?" asked the rabbit. "To the river, to see the fish," answered the duck.
Numbers like 1, 2, 3, 42, 100 and 2024 appear in texts, and so do names like Anna and Ben.
"""

_TOKENIZER_CACHE = {}  # vocab_size -> serialized model bytes


def make_tokenizer(folder, vocab_size=320):
    """Train a tiny SentencePiece BPE model (byte_fallback, like LLaMA's); write folder/tokenizer.model.

    The trained bytes are cached per vocab_size, so repeated calls only copy.
    """
    if vocab_size not in _TOKENIZER_CACHE:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_TEXT.splitlines() * 4),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,  # unknown characters become <0xNN> pieces, as in LLaMA
            character_coverage=1.0,
            split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            minloglevel=2,
        )
        _TOKENIZER_CACHE[vocab_size] = model.getvalue()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(_TOKENIZER_CACHE[vocab_size])
    return path


class Checkpoint(NamedTuple):
    state_dict: dict  # full, unsharded, float32 torch tensors (values as stored, upcast)
    config: dict      # explicit dims, the keys reference_logits and convert.py's config.json use
    params: dict      # exactly what was written to params.json


def llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's FeedForward sizing: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def make_checkpoint(folder, flavour="llama2", n_shards=1, seed=0, dtype=torch.float32, **dims):
    """Write a tiny random model in Meta's layout: consolidated.NN.pth, params.json, tokenizer.model.

    dims (all optional): dim=64, n_layers=2, n_heads=4, n_kv_heads (mistral: n_heads // 2,
    others: n_heads), head_dim, hidden_dim (mistral: 3 * dim; LLaMA: Meta's formula),
    multiple_of=32, ffn_dim_multiplier (codellama: 1.0), norm_eps=1e-5, vocab_size=320,
    rope_theta (codellama: 1e6), sliding_window (mistral: 16, so short tests exercise it).
    Shards split as Meta's model parallelism does. Returns Checkpoint(state_dict, config, params).
    """
    assert flavour in FLAVOURS, flavour
    dims = dict(dims)
    dim = dims.pop("dim", 64)
    n_layers = dims.pop("n_layers", 2)
    n_heads = dims.pop("n_heads", 4)
    default_kv = max(1, n_heads // 2) if flavour == "mistral" else n_heads
    n_kv_heads = dims.pop("n_kv_heads", default_kv)
    head_dim = dims.pop("head_dim", dim // n_heads)
    multiple_of = dims.pop("multiple_of", 32)
    ffn_dim_multiplier = dims.pop("ffn_dim_multiplier", 1.0 if flavour == "codellama" else None)
    hidden_dim = dims.pop("hidden_dim", None)
    if hidden_dim is None:
        hidden_dim = llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier) if flavour != "mistral" else 3 * dim
    norm_eps = dims.pop("norm_eps", 1e-5)
    vocab_size = dims.pop("vocab_size", 320)
    rope_theta = dims.pop("rope_theta", 1000000.0 if flavour == "codellama" else 10000.0)
    sliding_window = dims.pop("sliding_window", 16 if flavour == "mistral" else None)
    assert not dims, f"unknown dims: {sorted(dims)}"
    assert n_heads % n_kv_heads == 0

    # params.json as the real flavours write it.
    if flavour in ("llama1", "llama2", "codellama"):
        assert head_dim * n_heads == dim, "LLaMA params have no head_dim: it is dim // n_heads"
        assert hidden_dim == llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier), \
            "LLaMA params have no hidden_dim: choose multiple_of / ffn_dim_multiplier instead"
        params = {"dim": dim, "multiple_of": multiple_of, "n_heads": n_heads, "n_layers": n_layers,
                  "norm_eps": norm_eps, "vocab_size": -1}
        if n_kv_heads != n_heads:
            params["n_kv_heads"] = n_kv_heads  # LLaMA 2 70B style GQA
        if ffn_dim_multiplier is not None:
            params["ffn_dim_multiplier"] = ffn_dim_multiplier
        if flavour == "codellama":
            del params["vocab_size"]  # Code Llama's params.json has no vocab_size at all
        if flavour == "codellama" or rope_theta != 10000.0:
            params["rope_theta"] = rope_theta
    else:
        params = {"dim": dim, "n_layers": n_layers, "head_dim": head_dim, "hidden_dim": hidden_dim,
                  "n_heads": n_heads, "n_kv_heads": n_kv_heads, "norm_eps": norm_eps,
                  "sliding_window": sliding_window, "vocab_size": vocab_size}
        if rope_theta != 10000.0:
            params["rope_theta"] = rope_theta

    config = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "head_dim": head_dim, "hidden_dim": hidden_dim, "norm_eps": norm_eps,
              "vocab_size": vocab_size, "rope_theta": float(rope_theta),
              "sliding_window": sliding_window}

    g = torch.Generator().manual_seed(seed)

    def linear(n_out, n_in):
        # std 1/sqrt(n_in): activations stay O(1), so attention is far from uniform.
        return torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)  # not all ones, so a dropped norm shows

    sd = {"tok_embeddings.weight": torch.randn(vocab_size, dim, generator=g),
          "norm.weight": norm(dim),
          "output.weight": linear(vocab_size, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = linear(n_heads * head_dim, dim)
        sd[p + "attention.wk.weight"] = linear(n_kv_heads * head_dim, dim)
        sd[p + "attention.wv.weight"] = linear(n_kv_heads * head_dim, dim)
        sd[p + "attention.wo.weight"] = linear(dim, n_heads * head_dim)
        sd[p + "feed_forward.w1.weight"] = linear(hidden_dim, dim)
        sd[p + "feed_forward.w2.weight"] = linear(dim, hidden_dim)
        sd[p + "feed_forward.w3.weight"] = linear(hidden_dim, dim)
        sd[p + "attention_norm.weight"] = norm(dim)
        sd[p + "ffn_norm.weight"] = norm(dim)
    sd = {k: v.to(dtype) for k, v in sd.items()}  # the values as stored
    if flavour in ("llama1", "llama2"):
        # Old Meta checkpoints carry the RoPE frequencies as a buffer: not a weight.
        sd["rope.freqs"] = (1.0 / rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(dtype)

    os.makedirs(folder, exist_ok=True)
    for n, shard in enumerate(shard_state_dict(sd, n_shards)):
        torch.save(shard, os.path.join(folder, f"consolidated.{n:02d}.pth"))
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    make_tokenizer(folder, vocab_size)

    full = {k: v.float() for k, v in sd.items() if k != "rope.freqs"}
    return Checkpoint(full, config, params)


COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # split on dim 0 (outputs)
ROW_PARALLEL = ("wo", "w2", "tok_embeddings")               # split on dim 1 (inputs)


def shard_kind(key):
    """'column', 'row' or 'replicated' for a Meta checkpoint key."""
    name = key.split(".")[-2] if key.endswith(".weight") else key
    if name in COLUMN_PARALLEL:
        return "column"
    if name in ROW_PARALLEL:
        return "row"
    return "replicated"


def shard_state_dict(sd, n_shards):
    """Split a full state dict as Meta's model-parallel checkpoints are split."""
    if n_shards == 1:
        return [sd]
    shards = [{} for _ in range(n_shards)]
    for key, tensor in sd.items():
        kind = shard_kind(key)
        if kind == "replicated":
            parts = [tensor.clone() for _ in range(n_shards)]
        else:
            axis = 0 if kind == "column" else 1
            assert tensor.shape[axis] % n_shards == 0, f"{key}: {tuple(tensor.shape)} not divisible by {n_shards}"
            parts = [p.clone() for p in torch.chunk(tensor, n_shards, dim=axis)]  # clone: own storage
        for shard, part in zip(shards, parts):
            shard[key] = part
    return shards


def full_config(state_dict, params_like):
    """Explicit dims from a config, a config.json or a raw params.json, filling gaps from the weights."""
    p = dict(params_like)
    dim = p["dim"]
    n_heads = p["n_heads"]
    head_dim = p.get("head_dim") or dim // n_heads
    wk = state_dict["layers.0.attention.wk.weight"]
    return {
        "dim": dim,
        "n_layers": p["n_layers"],
        "n_heads": n_heads,
        "n_kv_heads": p.get("n_kv_heads") or wk.shape[0] // head_dim,
        "head_dim": head_dim,
        "hidden_dim": p.get("hidden_dim") or state_dict["layers.0.feed_forward.w1.weight"].shape[0],
        "norm_eps": p["norm_eps"],
        "vocab_size": state_dict["tok_embeddings.weight"].shape[0],
        "rope_theta": float(p.get("rope_theta") or 10000.0),
        "sliding_window": p.get("sliding_window"),
    }


def _as_torch(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype)
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(dtype)


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x_BTNH, cis_TP):
    # Meta's RoPE: consecutive pairs (x0, x1), (x2, x3)... are complex numbers
    # rotated by position * frequency.
    B, T, N, H = x_BTNH.shape
    x_c = torch.view_as_complex(x_BTNH.reshape(B, T, N, H // 2, 2).contiguous())
    return torch.view_as_real(x_c * cis_TP[None, :, None, :]).reshape(B, T, N, H)


@torch.no_grad()
def reference_logits(state_dict, params_like, tokens, compute_dtype=torch.float32):
    """Logits (B, T, V) of Meta's LLaMA / Mistral forward, as numpy float32.

    state_dict: Meta keys -> torch tensors or arrays (rope.freqs ignored).
    params_like: a dict with at least dim, n_layers, n_heads, norm_eps (missing
    n_kv_heads, head_dim, hidden_dim, vocab_size, rope_theta, sliding_window come
    from the weights / defaults). tokens: 2-D ints (B, T).
    """
    cfg = full_config(state_dict, params_like)
    w = {k: _as_torch(v, compute_dtype) for k, v in state_dict.items() if k != "rope.freqs"}
    tokens_BT = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    assert tokens_BT.ndim == 2, "tokens must be 2-D (B, T)"
    B, T = tokens_BT.shape
    N, K, H, eps = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], cfg["norm_eps"]

    freqs_P = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, H, 2, dtype=torch.float64)[: H // 2] / H))
    angles_TP = torch.outer(torch.arange(T, dtype=torch.float64), freqs_P)
    complex_dtype = torch.complex64 if compute_dtype == torch.float32 else torch.complex128
    cis_TP = torch.polar(torch.ones_like(angles_TP), angles_TP).to(complex_dtype)

    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed_TT = j <= i  # causal
    if cfg["sliding_window"] is not None:
        allowed_TT &= j > i - cfg["sliding_window"]  # Mistral: keys i-W+1 .. i

    h_BTD = w["tok_embeddings.weight"][tokens_BT]
    for layer in range(cfg["n_layers"]):
        p = f"layers.{layer}."
        x_BTD = _rms_norm(h_BTD, w[p + "attention_norm.weight"], eps)
        q_BTNH = (x_BTD @ w[p + "attention.wq.weight"].T).reshape(B, T, N, H)
        k_BTKH = (x_BTD @ w[p + "attention.wk.weight"].T).reshape(B, T, K, H)
        v_BTKH = (x_BTD @ w[p + "attention.wv.weight"].T).reshape(B, T, K, H)
        q_BTNH, k_BTKH = _rotate(q_BTNH, cis_TP), _rotate(k_BTKH, cis_TP)
        # GQA: KV head k serves query heads k*N/K .. (k+1)*N/K - 1 (Meta's repeat_kv).
        k_BTNH = k_BTKH.repeat_interleave(N // K, dim=2)
        v_BTNH = v_BTKH.repeat_interleave(N // K, dim=2)
        q_BNTH, k_BNTH, v_BNTH = (t.transpose(1, 2) for t in (q_BTNH, k_BTNH, v_BTNH))
        scores_BNTT = q_BNTH @ k_BNTH.transpose(-1, -2) / math.sqrt(H)
        scores_BNTT = scores_BNTT.masked_fill(~allowed_TT, float("-inf"))
        attn_BNTH = torch.softmax(scores_BNTT, dim=-1) @ v_BNTH
        attn_BTD = attn_BNTH.transpose(1, 2).reshape(B, T, N * H)
        h_BTD = h_BTD + attn_BTD @ w[p + "attention.wo.weight"].T

        x_BTD = _rms_norm(h_BTD, w[p + "ffn_norm.weight"], eps)
        gate_BTC = torch.nn.functional.silu(x_BTD @ w[p + "feed_forward.w1.weight"].T)
        up_BTC = x_BTD @ w[p + "feed_forward.w3.weight"].T
        h_BTD = h_BTD + (gate_BTC * up_BTC) @ w[p + "feed_forward.w2.weight"].T

    h_BTD = _rms_norm(h_BTD, w["norm.weight"], eps)
    return (h_BTD @ w["output.weight"].T).to(torch.float32).numpy()

