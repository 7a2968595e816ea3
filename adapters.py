"""LoRA adapter files: save, load and fold into the base weights.

An adapter file (`adapters.npz` or `.safetensors`) holds the trained `lora_a`
and `lora_b` arrays under the model's parameter names; its LoRA configuration
(layers, targets, rank, alpha) sits beside it with the same name and `.json`,
so the adapters can be restored onto a fresh base model. A PEFT adapter folder
(formats/peft.py) is read as well, wherever an adapter file is.
"""

import dataclasses
import os

import utils
from utils import UserError, read_json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

import models
import ops
from formats import peft


def config_path(adapter_file):
    """Where the LoRA configuration of `adapter_file` lives: same name, `.json`."""
    return os.path.splitext(adapter_file)[0] + ".json"


def save(model, adapter_file, config):
    """Write the adapter weights and, beside them, their AdapterConfig; both atomically."""
    arrays = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, v in arrays.items() if not mx.isfinite(v).all().item()]
    if bad:
        raise UserError(f"{adapter_file}: not written, adapter {bad[0]} has non-finite values")
    utils.write_json(config_path(adapter_file), config.to_json())
    utils.atomic_save_arrays(adapter_file, arrays)


def load(model, adapter_file):
    """Wrap `model` as the adapter configuration says and load the adapter weights: an
    adapter file of this toolkit (with its .json), or a PEFT folder (PEFT, Unsloth).

    Adapters that do not fit the model (other dims, layers or rank) are a UserError.
    """
    config, weights = read(adapter_file, vars(model.args))
    models.apply_lora(model, dataclasses.replace(config, dropout=0.0))
    _load_into(model, adapter_file, weights)
    return config


def read(adapter_file, model_config):
    """(AdapterConfig, {name: array}) of an adapter file or a PEFT folder, every array finite."""
    if peft.is_peft_folder(adapter_file):
        config, arrays = peft.read(adapter_file, model_config)
    else:
        path = config_path(adapter_file)
        config = models.AdapterConfig.from_json(read_json(path, "adapter configuration"), path)
        if config.type != "full":  # its targets as the model's family names them
            config = dataclasses.replace(config, targets=models.names_of(model_config).resolve_targets(
                config.targets, f"{path}: 'targets'"))
        arrays = utils.load_arrays(adapter_file, "adapter file")
    return config, finite_arrays(adapter_file, arrays)


def finite_arrays(adapter_file, arrays):
    """`arrays`, checked to be floating-point numbers and finite: NaN adapters are named as such,
    not later as a base model or an export that went wrong."""
    for name, w in arrays.items():
        if not mx.issubdtype(w.dtype, mx.floating) or not mx.isfinite(w).all().item():
            raise UserError(f"{adapter_file}: adapter {name} is not finite floating-point numbers")
    return arrays


def load_weights(model, adapter_file):
    """Load saved adapter weights (the file alone, --resume-adapter-file) into a model already
    wrapped with LoRA layers of that shape."""
    weights = finite_arrays(adapter_file, utils.load_arrays(adapter_file, "adapter file"))
    _load_into(model, adapter_file, weights)


def _load_into(model, adapter_file, weights):
    utils.check_fit(adapter_file, weights, dict(tree_flatten(model.trainable_parameters())), "adapters")
    model.update(tree_unflatten(list(weights.items())))


def merge(model):
    """Fold every LoRA (or DoRA) layer over a plain float base into that base: W + scale (A B)^T
    (DoRA: its rows rescaled to the trained magnitudes).

    For generation alone: a decoded token then runs one product a layer instead of
    three. The sum is kept in float32, the adapters' dtype, where the CPU kernels
    compute in float32, else in the base's dtype. Quantized bases keep their
    adapters: folding would requantize them (DoRA's rescaling is computed once instead).
    """
    folded = []
    for name, module in model.named_modules():
        if isinstance(module, models.LoRALinear) and type(module.linear) is models.Linear and "bias" not in module.linear:
            base = module.linear
            dtype = mx.float32 if ops.active() else base.weight.dtype
            base.weight = module.fold(base.weight).astype(dtype)
            folded.append((name, base))
        elif isinstance(module, models.DoRALinear):
            module.fix_rescale()
    model.update_modules(tree_unflatten(folded))
