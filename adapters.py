"""LoRA adapter files: save, load and fold into the base weights.

An adapter file (`adapters.npz` or `.safetensors`) holds the trained `lora_a`
and `lora_b` arrays under the model's parameter names; its LoRA configuration
(layers, targets, rank, alpha) sits beside it with the same name and `.json`,
so the adapters can be restored onto a fresh base model.
"""

import os

import utils
from utils import UserError, read_json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

import models
import ops


def config_path(adapter_file):
    """Where the LoRA configuration of `adapter_file` lives: same name, `.json`."""
    return os.path.splitext(adapter_file)[0] + ".json"


def save(model, adapter_file, lora_config):
    """Write the adapter weights and, beside them, their configuration; both atomically."""
    arrays = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, v in arrays.items() if not mx.isfinite(v).all().item()]
    if bad:
        raise UserError(f"{adapter_file}: not written, adapter {bad[0]} has non-finite values")
    utils.write_json(config_path(adapter_file), lora_config)
    utils.atomic_save_arrays(adapter_file, arrays)


def load(model, adapter_file):
    """Wrap `model` as the adapter configuration says and load the adapter weights.

    Adapters that do not fit the model (other dims, layers or rank) are a UserError.
    """
    path = config_path(adapter_file)
    config = read_json(path, "adapter configuration")
    try:
        lora = models.apply_lora(model, int(config["lora_layers"]), tuple(config["targets"]),
                                 int(config["rank"]), float(config["alpha"]), 0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: bad adapter configuration ({e!r})")
    load_weights(model, adapter_file)
    return lora


def load_weights(model, adapter_file):
    """Load saved adapter weights into a model already wrapped with LoRA layers of that shape."""
    weights = utils.load_arrays(adapter_file, "adapter file")
    utils.check_fit(adapter_file, weights, dict(tree_flatten(model.trainable_parameters())), "adapters")
    model.update(tree_unflatten(list(weights.items())))


def merge(model):
    """Fold every LoRA layer over a plain float base into that base: W + scale (A B)^T.

    For generation alone: a decoded token then runs one product a layer instead of
    three. The sum is kept in float32, the adapters' dtype, where the CPU kernels
    compute in float32, else in the base's dtype. Quantized bases keep their
    adapters: folding would requantize them.
    """
    folded = []
    for name, module in model.named_modules():
        if isinstance(module, models.LoRALinear) and type(module.linear) is models.Linear and "bias" not in module.linear:
            base = module.linear
            delta_OI = module.scale * (module.lora_a @ module.lora_b).T
            dtype = mx.float32 if ops.active() else base.weight.dtype
            base.weight = (base.weight.astype(mx.float32) + delta_OI).astype(dtype)
            folded.append((name, base))
    model.update_modules(tree_unflatten(folded))
