"""A model's config from GGUF metadata (architecture, sizes, RoPE and its scaling, special tokens),
every value checked; and the RoPE metadata written back.
"""

import math

import numpy as np

from utils import UserError

from models import FAMILIES, hook
from models.layers import rope_dims
from formats.gguf.header import brief, is_int
from formats.gguf.names import ROPE_FREQS
from formats.gguf.vocabulary import WHOLE_PIECE_PRES


LLAMA3_ROPE = (1.0, 4.0, 8192)    # Llama 3.1-3.3's low_freq_factor, high_freq_factor, original context
# The tokens llama.cpp's vocabulary loader takes for the end of generation by their text (llama-vocab.cpp)
LLAMA_CPP_END_NAMES = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                                 "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"})


def check_architecture(meta, path):
    """(general.architecture, the model_type of its family): one llama.cpp writes for a family here."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise UserError(f"{path}: no general.architecture in its metadata")
    kinds = {family.GGUF_ARCH: family.MODEL_TYPES[0] for family in FAMILIES.values()}
    if arch not in kinds:
        raise UserError(f"{path}: architecture {brief(arch)} is not supported (supported: {', '.join(kinds)})")
    experts = meta.get(f"{arch}.expert_count", 0)
    if experts:
        raise UserError(f"{path}: {arch}.expert_count {brief(experts)}: mixture-of-experts models are not "
                        "supported")
    return arch, kinds[arch]


def positive_int(meta, key, path, default=None):
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"{path}: metadata key {key} is missing")
    if not is_int(value) or value < 1:
        raise UserError(f"{path}: {key} must be a positive integer, got {brief(value)}")
    return value


def positive_number(meta, key, path, default=None):
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"{path}: metadata key {key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserError(f"{path}: {key} must be a positive finite number, got {brief(value)}")
    return float(value)


def derive_config(meta, entries, path, rope_freqs, arch="llama"):
    """convert.py's config keys and the tokenizer's, from the ARCH.* and tokenizer.ggml.* keys."""
    def key(name):
        return f"{arch}.{name}"

    n_layers = positive_int(meta, key("block_count"), path)
    if n_layers > len(entries):  # bounds the weights the config's table will list
        raise UserError(f"{path}: {key('block_count')} {n_layers} but the file holds only {len(entries)} tensors")
    dim = positive_int(meta, key("embedding_length"), path)
    n_heads = positive_int(meta, key("attention.head_count"), path)
    n_kv_heads = positive_int(meta, key("attention.head_count_kv"), path, n_heads)
    if n_heads % n_kv_heads:
        raise UserError(f"{path}: {key('attention.head_count')} {n_heads} is not a multiple of "
                        f"{key('attention.head_count_kv')} {n_kv_heads}")
    if key("attention.key_length") not in meta and dim % n_heads:
        raise UserError(f"{path}: {key('embedding_length')} {dim} is not divisible by {key('attention.head_count')} "
                        f"{n_heads} (and no {key('attention.key_length')})")
    head_dim = positive_int(meta, key("attention.key_length"), path, dim // n_heads)
    if positive_int(meta, key("attention.value_length"), path, head_dim) != head_dim:
        raise UserError(f"{path}: {key('attention.value_length')} {meta[key('attention.value_length')]} differs "
                        f"from the head size {head_dim} (other value sizes are not supported)")
    turned = positive_int(meta, key("rope.dimension_count"), path, head_dim)
    rope_theta = positive_number(meta, key("rope.freq_base"), path, 10000.0)
    config = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "head_dim": head_dim, "hidden_dim": positive_int(meta, key("feed_forward_length"), path),
              "norm_eps": positive_number(meta, key(norm_eps_key(FAMILIES[kind_of(arch)])), path),
              "vocab_size": vocab_size(meta, entries, path, arch), "rope_theta": rope_theta, "sliding_window": None,
              "tie_word_embeddings": "output.weight" not in entries}
    if key("context_length") in meta:
        config["context_length"] = positive_int(meta, key("context_length"), path)
    scaling = rope_scaling(meta, path, rope_freqs, rope_theta, head_dim, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    config.update(special_tokens(meta, config["vocab_size"], path))
    config.update(hook(FAMILIES[kind_of(arch)], "from_gguf")(meta, arch, path))
    if turned != rope_dims(config):  # Phi-3's from_gguf reads it into partial_rotary_factor
        raise UserError(f"{path}: {key('rope.dimension_count')} {turned} differs from the head size {head_dim} "
                        f"(partial rotary is not supported for {arch})")
    return config


def norm_eps_key(family):
    """The GGUF key (after ARCH.) of the family's norms' epsilon: RMSNorm's, unless it says (GPT-2's LayerNorm)."""
    return getattr(family, "GGUF_NORM_EPS", "attention.layer_norm_rms_epsilon")


def kind_of(arch):
    """The model_type of the family whose GGUF architecture is `arch`."""
    return next(kind for kind, family in FAMILIES.items() if family.GGUF_ARCH == arch)


def vocab_size(meta, entries, path, arch="llama"):
    """ARCH.vocab_size, else the token list's length: the embedding's rows (checked with the shapes)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{path}: tokenizer.ggml.tokens must be a list of token strings, got "
                        f"{type(tokens).__name__ if tokens is not None else 'nothing'}")
    size = positive_int(meta, f"{arch}.vocab_size", path, len(tokens))
    if size != len(tokens):
        raise UserError(f"{path}: {arch}.vocab_size {size} but tokenizer.ggml.tokens holds {len(tokens)} tokens")
    return size


def rope_scaling(meta, path, rope_freqs, theta, head_dim, arch="llama"):
    """The config's rope_scaling: linear from ARCH.rope.scaling.*, llama3 recovered from rope_freqs."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_freqs is not None:
        if kind != "none":
            raise UserError(f"{path}: both {arch}.rope.scaling.type {brief(kind)} and {ROPE_FREQS}: not supported")
        if rope_freqs.shape != (head_dim // 2,):
            raise UserError(f"{path}: {ROPE_FREQS} has shape {rope_freqs.shape}, expected ({head_dim // 2},)")
        return llama3_rope_scaling(rope_freqs.astype(np.float64), theta, head_dim, path)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": positive_number(meta, f"{arch}.rope.scaling.factor", path)}
    raise UserError(f"{path}: RoPE scaling {brief(kind)} is not supported (supported: linear, and Llama 3's "
                    f"{ROPE_FREQS})")


def llama3_rope_factors(wavelength, factor, low, high, old):
    """Each RoPE frequency's divisor under Llama 3.1's scaling (llama.cpp's rope_freqs)."""
    smooth = (old / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < old / high, 1.0, np.where(wavelength > old / low, factor, blended))


@np.errstate(all="ignore")  # a stranger's NaN or infinity: no warnings printed
def llama3_rope_scaling(factors, theta, head_dim, path):
    """Llama 3.1's scaling parameters that give the file's rope_freqs.

    The divisors are factor for long wavelengths, 1 for short ones and a blend between, linear in
    old / wavelength; any (low, high, old) with the same blend gives the same model. Llama 3's own
    values are tried first, then those the first and last blended divisors give."""
    refusal = UserError(f"{path}: {ROPE_FREQS} does not follow Llama 3's RoPE scaling (factor, low/high "
                        "frequency factors, original context); other per-frequency scalings are not supported")
    if not np.all(np.isfinite(factors) & (factors >= 1.0)):
        raise refusal
    if np.all(factors == 1.0):
        return None
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(str(np.float32(factors.max())))
    candidates = [LLAMA3_ROPE]
    middle = np.flatnonzero((factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6)))
    if len(middle) >= 2:
        x = 1 / wavelength[middle[[0, -1]]]
        smooth = (1 / factors[middle[[0, -1]]] - 1 / factor) / (1 - 1 / factor)  # = a x + b
        a = (smooth[1] - smooth[0]) / (x[1] - x[0])
        b = smooth[0] - a * x[0]
        if b < 0 < a and np.isfinite(a / b):  # low = 1: high = 1 - 1 / b, old = -a / b
            candidates.append((1.0, float(f"{1 - 1 / b:.6g}"), round(-a / b)))
    if len(middle) == 1:  # one blended divisor: low 1, a whole context near Llama's high 4, the high that fits
        wave, smooth = wavelength[middle[0]], (1 / factors[middle[0]] - 1 / factor) / (1 - 1 / factor)
        old = round(wave * (1 + (LLAMA3_ROPE[1] - 1) * smooth))
        candidates.append((1.0, float(f"{1 + (old / wave - 1) / smooth:.6g}"), old))
    for low, high, old in candidates:
        if np.allclose(llama3_rope_factors(wavelength, factor, low, high, old), factors, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old}
    raise refusal


def special_tokens(meta, n_tokens, path):
    """bos_token_id, eos_token_ids (the end of text, then end of turn and of message), add_bos_token."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not (is_int(value) and 0 <= value < n_tokens):
            raise UserError(f"{path}: tokenizer.ggml.{key} must be a token id below {n_tokens}, got {brief(value)}")
        ids[key] = value
    ends = [ids[key] for key in ("eos_token_id", "eot_token_id", "eom_token_id") if ids[key] is not None]
    # llama.cpp also ends generation at the end-of-turn tokens it knows by name (Gemma's files set no eot)
    ends += [i for i, text in enumerate(meta.get("tokenizer.ggml.tokens") or []) if text in LLAMA_CPP_END_NAMES]
    ends = sorted(set(ends), key=ends.index)
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    # llama.cpp's convention when the file does not say: SentencePiece, Llama 3 and tekken vocabularies add BOS
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama" or pre in WHOLE_PIECE_PRES)
    if not isinstance(add_bos, bool):
        raise UserError(f"{path}: tokenizer.ggml.add_bos_token must be true or false, got {brief(add_bos)}")
    return {"bos_token_id": ids["bos_token_id"], "eos_token_ids": ends, "add_bos_token": add_bos}


# A config without context_length came from Meta's params.json, which does not say: Llama 2's and
# Mistral's 4096 gives llama.cpp a default context that every such model handles.
DEFAULT_CONTEXT = 4096


def exported_rope_freqs(config):
    """Llama 3.1's scaling as llama.cpp's converter writes it: each frequency's divisor, float32
    [head_dim / 2], in rope_freqs.weight; None for other models."""
    scaling = config.get("rope_scaling")
    if scaling is None or scaling["rope_type"] != "llama3":
        return None
    head_dim = config["head_dim"]
    wavelength = 2 * np.pi * config["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    return llama3_rope_factors(wavelength, scaling["factor"], scaling["low_freq_factor"],
                               scaling["high_freq_factor"],
                               scaling["original_max_position_embeddings"]).astype(np.float32)
