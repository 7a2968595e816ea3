"""A model's configuration checked, once for every path in: convert.py validates what it reads
(Hugging Face, GGUF, Meta) before writing anything, and loading validates a model folder's
config.json, with the same bounds, so whatever converts loads and runs.
"""

from dataclasses import MISSING, fields

import utils
from utils import UserError

from models import gemma, gemma2, gemma3, gpt2, llama, phi3, qwen2, qwen3
from models.layers import rope_dims

# Every family, by the model_type a config names (none: LLaMA, as folders before families were).
FAMILIES = {kind: family for family in (llama, qwen2, qwen3, gemma, gemma2, gemma3, phi3, gpt2)
            for kind in family.MODEL_TYPES}


# The numbers of config.json the model uses: (type, lowest, highest). The bounds keep a
# hostile file from asking for terabytes before a weight is read.
CONFIG_KEYS = {
    "dim": (int, 1, 2**17), "n_layers": (int, 1, 2**10), "n_heads": (int, 1, 2**12), "n_kv_heads": (int, 1, 2**12),
    "head_dim": (int, 1, 2**12), "hidden_dim": (int, 1, 2**19), "norm_eps": (float, 1e-12, 1.0),
    "vocab_size": (int, 1, 2**22), "rope_theta": (float, 1.0, 1e12), "sliding_window": (int, 1, 2**31),
    "context_length": (int, 1, 2**31),
}
# What each RoPE scaling every family's RoPE computes needs: (key, type, lowest, highest); a family
# adds those only its own computes (its ROPE_SCALINGS). A type `list`: one number a turned pair.
ROPE_SCALINGS = {
    "linear": [("factor", float, 1e-3, 1e6)],
    "llama3": [("factor", float, 1.0, 1e6), ("low_freq_factor", float, 1e-6, 1e6),
               ("high_freq_factor", float, 1e-6, 1e6), ("original_max_position_embeddings", int, 1, 2**31)],
}


def family(config, source="config.json"):
    """The module of the family `config` (a dict, or ModelArgs) is of."""
    kind = config.get("model_type", "llama") if isinstance(config, dict) else config.model_type
    if kind not in FAMILIES:
        raise UserError(f"{source}: model_type {str(kind)[:100]!r} is not supported (supported: "
                        f"{', '.join(FAMILIES)})")
    return FAMILIES[kind]


def hook(of, name):
    """A family's optional hook (from_hf, to_hf, from_gguf, to_gguf, gguf_tensors): what its formats'
    readers and writers call for the config keys (and GGUF tensors) only that family has; none for
    LLaMA's and Qwen's."""
    return getattr(of, name, _NO_KEYS)


def _NO_KEYS(*args):
    return {}


def names_of(config):
    """The NameTable of the family of `config`."""
    return family(config).NAMES


def model_args(config, source="config.json"):
    """The family's ModelArgs from a model folder's configuration, every key the model uses checked."""
    of = family(config, source)
    ModelArgs = of.ModelArgs
    names = {f.name: f for f in fields(ModelArgs)}
    missing = [name for name, f in names.items() if f.default is MISSING and config.get(name) is None]
    if missing:
        raise UserError(f"{source}: missing key(s) {', '.join(missing)}")
    keys = {**CONFIG_KEYS, **getattr(of, "CONFIG_KEYS", {})}
    values = {name: utils.checked_number(config[name], *keys[name], f"{source}: '{name}'")
              for name in keys if config.get(name) is not None}
    if "model_type" in config:
        values["model_type"] = config["model_type"]
    tie = config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise UserError(f"{source}: 'tie_word_embeddings' must be true or false, got {tie!r}")
    args = ModelArgs(**values, tie_word_embeddings=tie)
    if args.n_heads % args.n_kv_heads:
        raise UserError(f"{source}: n_heads {args.n_heads} is not a multiple of n_kv_heads {args.n_kv_heads}")
    if args.head_dim % 2:
        raise UserError(f"{source}: head_dim {args.head_dim} is odd: RoPE turns pairs")
    turned = rope_dims(vars(args))
    if turned % 2 or not turned:
        raise UserError(f"{source}: partial_rotary_factor {args.partial_rotary_factor} turns {turned} of each "
                        f"head's {args.head_dim} dims: RoPE turns pairs")
    scalings = {**ROPE_SCALINGS, **getattr(of, "ROPE_SCALINGS", {})}
    args.rope_scaling = rope_scaling(config.get("rope_scaling"), source, scalings, turned // 2)
    return args


def rope_scaling(scaling, source, scalings, pairs):
    """A RoPE scaling block checked ({"rope_type": ..., its numbers}), or None: one of `scalings`, its
    lists of `pairs` numbers."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in scalings:
        raise UserError(f"{source}: 'rope_scaling' must be {' or '.join(scalings)} with its numbers, "
                        f"got {str(scaling)[:200]}")
    return {"rope_type": kind, **{key: _checked(scaling.get(key), kind_, low, high, f"{source}: 'rope_scaling.{key}'",
                                                pairs) for key, kind_, low, high in scalings[kind]}}


def _checked(value, kind, low, high, where, pairs):
    """A number of a RoPE scaling, or, for a `list`, its number for each of `pairs` turned pairs."""
    if kind is not list:
        return utils.checked_number(value, kind, low, high, where)
    if not isinstance(value, list) or len(value) != pairs:
        raise UserError(f"{where} must be a list of {pairs} numbers (one a turned pair of a head), got "
                        f"{str(value)[:100]}")
    return [utils.checked_number(x, float, low, high, f"{where}[{i}]") for i, x in enumerate(value)]


def checked_shapes(config, source):
    """{name: shape} of every weight of a model of `config`, after the config is checked (its
    counts bounded, so the list stays small whatever a file says)."""
    model_args(config, source)
    return names_of(config).shapes(config)
