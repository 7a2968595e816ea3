"""Loading a converted model folder: its configuration, weights, tokenizer and adapters,
and the dtype the model computes in.

A model folder (what convert.py and pretrain.py write) holds config.json,
weights.npz or weights.safetensors, and the tokenizer's files. `load_model` is
the one loader: scripts, benchmarks and users' own code call it.
"""

import os

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError, read_json

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import adapters
import downloads
import models
import ops
from formats import QUANT_BITS, QUANT_GROUP_SIZES
from formats.mlx import GGUF_TYPE
from tokenizer import load_tokenizer

# SmolLM2-135M-Instruct, which setup.sh fetches and converts (kept 4-bit): what the scripts use
# without --model.
DEFAULT_MODEL = os.path.join(downloads.CHECKPOINTS, "SmolLM2-135M-Instruct")
DEFAULT_GGUF = downloads.ARTEFACTS["smollm2"].path  # the file it is converted from


def load_model(path, adapter_file=None, compute_dtype="auto", generation_only=False):
    """Load a converted model folder: (model, tokenizer, config).

    `compute_dtype` and `generation_only`: see set_compute_dtype. With
    `adapter_file`, its LoRA adapters are applied (and merged, for generation alone:
    see adapters.merge). The small files are checked before the weights are read.
    """
    if not os.path.isdir(path):
        raise UserError(f"{path}: model folder not found")
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path, "model configuration")
    args = models.model_args(config, config_path)
    q = quantization(config, config_path)
    tokenizer = load_tokenizer(path, tokenizer_settings(config, config_path))
    if tokenizer.vocab_size > args.vocab_size:
        raise UserError(f"{path}: tokenizer has {tokenizer.vocab_size} pieces, the model only {args.vocab_size}")
    model = models.build(args)
    weights_path = weights_file(path)
    weights = utils.load_arrays(weights_path)
    if q:
        nn.quantize(model, class_predicate=lambda name, module: f"{name}.scales" in weights
                    and dict(zip(("group_size", "bits"), q.get(name, q[None]))))
    hold_blocks(model, block_types(config, config_path), config_path)
    utils.check_fit(weights_path, weights, dict(tree_flatten(model.parameters())), "weights")
    model.update(tree_unflatten(list(weights.items())))
    set_compute_dtype(model, compute_dtype, generation_only)
    if adapter_file is not None:
        adapters.load(model, adapter_file)
        if generation_only:
            adapters.merge(model)
    mx.eval(model.parameters())
    return model, tokenizer, config


def first_non_finite(model):
    """The name of the first parameter holding NaN or infinity, or None.

    Called to explain a non-finite loss or logits rather than on every load: a sum
    per tensor is cheap, but not free on a 7B model. The sum is taken in float32 so
    that large finite float16 weights do not overflow it.
    """
    for name, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating) and not mx.isfinite(p.astype(mx.float32).sum()).item():
            return name
    return None


def explain_non_finite(model, what):
    """Raise a UserError naming the parameter that made `what` non-finite, if one did."""
    name = first_non_finite(model)
    if name is not None:
        raise UserError(f"{what} is not finite: the model's {name} holds NaN or infinity")


def tokenizer_settings(config, source="config.json"):
    """The special-token keys of config.json, checked: bos_token_id, eos_token_ids, add_bos_token."""
    out = {}
    if config.get("bos_token_id") is not None:
        out["bos_token_id"] = utils.checked_number(config["bos_token_id"], int, 0, 2**31, f"{source}: 'bos_token_id'")
    if "eos_token_ids" in config:
        ends = config["eos_token_ids"]
        if not isinstance(ends, list):
            raise UserError(f"{source}: 'eos_token_ids' must be a list of token ids, got {ends!r}")
        out["eos_token_ids"] = [utils.checked_number(e, int, 0, 2**31, f"{source}: 'eos_token_ids'") for e in ends]
    if "add_bos_token" in config:
        if not isinstance(config["add_bos_token"], bool):
            raise UserError(f"{source}: 'add_bos_token' must be true or false, got {config['add_bos_token']!r}")
        out["add_bos_token"] = config["add_bos_token"]
    return out


def quantization(config, source="config.json"):
    """The quantization block of a model folder as {module path: (group_size, bits)} for the
    modules that differ from the default, plus the default under None; or None (also when its
    only modules hold GGUF blocks: block_types).

    {"group_size": 32, "bits": 4, "tok_embeddings": {"group_size": 32, "bits": 8}}: every
    quantized layer in groups of 32 at 4 bits, the embedding at 8.
    """
    q = _quantization_block(config, source)
    if q is None:
        return None
    affine = {name: value for name, value in q.items() if name not in ("group_size", "bits") and not _blocks(value)}
    if not affine and "group_size" not in q and "bits" not in q:
        return None
    out = {None: _group_and_bits(q, source, "quantization")}
    for name, value in affine.items():
        out[name] = _group_and_bits(value, source, f"quantization.{name}")
    return out


def block_types(config, source="config.json"):
    """{module path: GGUF type} of the linears a model folder holds in a GGUF file's own blocks:
    the quantization block's {"layers.0.feed_forward.w2": {"gguf_type": "Q6_K"}}."""
    q = _quantization_block(config, source) or {}
    out = {}
    for name, value in q.items():
        if _blocks(value):
            if set(value) != {GGUF_TYPE} or value[GGUF_TYPE] not in ops.BLOCK_TYPES:
                raise UserError(f"{source}: 'quantization.{name}' must be {{\"{GGUF_TYPE}\": one of "
                                f"{', '.join(ops.BLOCK_TYPES)}}}, got {value!r:.80}")
            out[name] = value[GGUF_TYPE]
    return out


def _quantization_block(config, source):
    q = config.get("quantization")
    if q is not None and not isinstance(q, dict):
        raise UserError(f"{source}: 'quantization' must be an object with group_size and bits, got {q!r}")
    return q


def _blocks(value):
    return isinstance(value, dict) and GGUF_TYPE in value


def hold_blocks(model, types, source="config.json"):
    """Each linear `types` names ({module path: GGUF type}) made a BlockQuantizedLinear, its blocks
    loaded after."""
    modules = dict(model.named_modules())
    for name in types:
        if not isinstance(modules.get(name), nn.Linear):
            raise UserError(f"{source}: 'quantization.{name}' holds GGUF blocks, but the model has no linear {name}")
    model.update_modules(tree_unflatten([(name, models.BlockQuantizedLinear.from_linear(modules[name], t))
                                         for name, t in types.items()]))


def _group_and_bits(q, source, where):
    if not isinstance(q, dict):
        raise UserError(f"{source}: '{where}' must be an object with group_size and bits, got {q!r}")
    for key, allowed in (("group_size", QUANT_GROUP_SIZES), ("bits", QUANT_BITS)):
        if key not in q:
            raise UserError(f"{source}: '{where}' has no '{key}'")
        if isinstance(q[key], bool) or q[key] not in allowed:
            raise UserError(f"{source}: '{where}.{key}' must be one of {', '.join(map(str, allowed))}, "
                            f"got {q[key]!r}")
    return q["group_size"], q["bits"]


def weights_file(path):
    for name in ("weights.safetensors", "weights.npz"):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    raise UserError(f"{path}: no weights.npz or weights.safetensors (convert a checkpoint with convert.py)")


# ----------------------------------------------------------------------------- dtype policy

def default_compute_dtype():
    """float32 on the CPU (its float16 matmul is slow and unstable), the stored dtype elsewhere."""
    return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None


def cast_floats(model, dtype, keep_float16_weights=False):
    """Cast the model's floating parameters (not packed quantized weights) to `dtype`;
    with keep_float16_weights, float16 weights of plain linear layers stay as they are."""
    kept = {f"{name}.weight" for name, module in model.named_modules()
            if keep_float16_weights and isinstance(module, nn.Linear) and module.weight.dtype == mx.float16}
    model.update(tree_unflatten([(k, p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) and k not in kept else p)
                                 for k, p in tree_flatten(model.parameters())]))


def set_compute_dtype(model, compute_dtype="auto", generation_only=False):
    """Cast the model's floats for computation in `compute_dtype`: "auto" (float32 on
    the CPU, the stored dtype on a GPU) or a dtype name.

    With `generation_only`, where the ops read float16 weights as they are, the
    float16 weights of linear layers stay float16 under float32 computation:
    decoding reads half the bytes and the model takes about half the memory.
    (Training and evaluation, whose products all go through BLAS, would convert
    them at every step.)
    """
    if mx.default_device() == mx.cpu:
        # bfloat16 on the CPU: float32 throughout but the frozen weights' products, on AMX tiles
        # (ops.py); MLX's own bfloat16 matmul is a scalar loop on x86. Set for every model loaded,
        # on or off, so that none inherits an earlier one's.
        bfloat16 = compute_dtype == "bfloat16"
        if bfloat16 and not ops.bfloat16_products_available():
            raise UserError("--compute-dtype bfloat16 on the CPU needs AMX bfloat16 tiles and the CPU kernels "
                            "(setup.sh); this machine has not both: use float32 (auto)")
        ops.use_bfloat16_products(bfloat16)
        compute_dtype = "float32" if bfloat16 else compute_dtype
    dtype = default_compute_dtype() if compute_dtype == "auto" else getattr(mx, compute_dtype)
    if dtype is not None:
        cast_floats(model, dtype, generation_only and dtype == mx.float32 and ops.reads_float16_weights())
