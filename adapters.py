"""LoRA adapter files: save, load and fold into the base weights.

An adapter file (`adapters.npz` or `.safetensors`) holds the trained `lora_a`
and `lora_b` arrays under the model's parameter names; its LoRA configuration
(layers, targets, rank, alpha) sits beside it with the same name and `.json`,
so the adapters can be restored onto a fresh base model. A PEFT adapter folder
(formats/peft.py) is read as well, wherever an adapter file is.
"""

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


def save(model, adapter_file, lora_config):
    """Write the adapter weights and, beside them, their configuration; both atomically."""
    arrays = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, v in arrays.items() if not mx.isfinite(v).all().item()]
    if bad:
        raise UserError(f"{adapter_file}: not written, adapter {bad[0]} has non-finite values")
    utils.write_json(config_path(adapter_file), lora_config)
    utils.atomic_save_arrays(adapter_file, arrays)


def load(model, adapter_file):
    """Wrap `model` as the adapter configuration says and load the adapter weights: an
    adapter file of this toolkit (with its .json), or a PEFT folder (PEFT, Unsloth).

    Adapters that do not fit the model (other dims, layers or rank) are a UserError.
    """
    lora, weights = read(adapter_file, vars(model.args))
    models.apply_lora(model, lora["lora_layers"], tuple(lora["targets"]), lora["rank"], lora["alpha"], 0.0,
                      lora["fine_tune_type"])
    _load_into(model, adapter_file, weights)
    return lora


def read(adapter_file, model_config):
    """(LoRA configuration, {name: array}) of an adapter file or a PEFT folder."""
    if peft.is_peft_folder(adapter_file):
        return peft.read(adapter_file, model_config)
    path = config_path(adapter_file)
    lora = checked_config(read_json(path, "adapter configuration"), path)
    return lora, utils.load_arrays(adapter_file, "adapter file")


def checked_config(config, where):
    """A LoRA configuration (what apply_lora returns) read from a file, every key checked."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: bad adapter configuration (expected an object, got {config!r})")
    missing = [k for k in ("lora_layers", "targets", "rank", "alpha") if k not in config]
    if missing:
        raise UserError(f"{where}: bad adapter configuration (no '{missing[0]}')")
    targets = config["targets"]
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) and t in models.LORA_TARGETS for t in targets)):
        raise UserError(f"{where}: 'targets' must be a list of {', '.join(models.LORA_TARGETS)}, got {targets!r}")
    return {"lora_layers": utils.checked_number(config["lora_layers"], int, 1, 2**16, f"{where}: 'lora_layers'"),
            "targets": targets,
            "rank": utils.checked_number(config["rank"], int, 1, 2**16, f"{where}: 'rank'"),
            "alpha": utils.checked_number(config["alpha"], float, 1e-12, 1e12, f"{where}: 'alpha'"),
            "dropout": utils.checked_number(config.get("dropout", 0.0), float, 0.0, 0.999, f"{where}: 'dropout'"),
            "fine_tune_type": checked_fine_tune_type(config.get("fine_tune_type", "lora"), where)}


def checked_fine_tune_type(value, where):
    if value not in models.FINE_TUNE_TYPES:
        raise UserError(f"{where}: 'fine_tune_type' must be one of {', '.join(models.FINE_TUNE_TYPES)}, "
                        f"got {value!r}")
    return value


def load_weights(model, adapter_file):
    """Load saved adapter weights (the file alone, --resume-adapter-file) into a model already
    wrapped with LoRA layers of that shape."""
    _load_into(model, adapter_file, utils.load_arrays(adapter_file, "adapter file"))


def _load_into(model, adapter_file, weights):
    utils.check_fit(adapter_file, weights, dict(tree_flatten(model.trainable_parameters())), "adapters")
    for name, w in weights.items():
        if not mx.issubdtype(w.dtype, mx.floating) or not mx.isfinite(w).all().item():
            raise UserError(f"{adapter_file}: adapter {name} is not finite floating-point numbers")
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
