"""PEFT's LoRA adapter folders (adapter_config.json and adapter_model.safetensors): what PEFT,
Unsloth and llama.cpp's convert_lora_to_gguf.py read and write.

PEFT names a LoRA's matrices after the Hugging Face module they adapt
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`) and stores them
transposed against this toolkit's: its lora_A is [r, in] (our A is [in, r]) and its
lora_B is [out, r] (our B is [r, out]); the update is (lora_alpha / r) B A, ours
(alpha / rank) (A B)^T: the same. The query and key rows of lora_B are in Hugging
Face's order, which keeps the two halves of every RoPE pair apart; ours are Meta's.
DoRA adds a magnitude per output row (`...q_proj.lora_magnitude_vector`, [out]), in the
same row order as lora_B. On GPT-2's Conv1D modules, whose weights are [in, out], PEFT's
matrices are the same; its config says fan_in_fan_out.
"""

import dataclasses
import json
import os
from types import SimpleNamespace

from utils import UserError, atomic_save_arrays, check_fit, checked_number, read_json, repeated, write_json

import mlx.core as mx

from formats.hf import hf_rows, our_rows
from formats.safetensors import SafetensorsFile
from models import AdapterConfig, names_of

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # before the Hugging Face name of the module adapted
# PEFT's names of the arrays of an adapted module, and ours.
PEFT_MATRICES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "magnitude"}
# PEFT's keys whose other values change what the adapters compute, and the one value supported here
# (fan_in_fan_out: that of the family, fan_in_fan_out()).
ONLY = {"peft_type": "LORA", "bias": "none"}
# PEFT's keys for per-module ranks and alphas and for whole modules saved beside the adapters: empty here.
EMPTY = ("rank_pattern", "alpha_pattern", "modules_to_save")
# Our AdapterConfig's keys as PEFT spells them, so that its checks name the key of the file.
SPELLED = {"lora_layers": "layers_to_transform", "targets": "target_modules", "rank": "r",
           "alpha": "lora_alpha", "dropout": "lora_dropout", "fine_tune_type": "use_dora"}


def is_peft_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def hf_module(table, linear):
    """The Hugging Face module name of one of a block's linears (of a family's NameTable), as
    PEFT's target_modules spell it: q_proj (GPT-2's attn.c_proj: c_proj alone names two)."""
    return next(name for name, ours in table.hf_linears.items() if ours == linear)


def fan_in_fan_out(table):
    """PEFT's flag for modules whose weights are [in, out] (GPT-2's Conv1D): it sets it for them itself."""
    return any(w.hf_transposed for w in table.block if w.linear)


def peft_module(table, module):
    """PEFT's name of one of our adapted modules: layers.N.attention.wq ->
    base_model.model.model.layers.N.self_attn.q_proj."""
    return PREFIX + table.rename(module + ".weight", "ours", "hf").removesuffix(".weight")


def write(folder, config: AdapterConfig, arrays, model_config, base_model_name):
    """Write adapters (this toolkit's names and layout) as a PEFT folder."""
    n_layers, table = model_config["n_layers"], names_of(model_config)
    layers = list(range(config.first_layer(n_layers), n_layers))
    tensors = {}
    for name, value in arrays.items():
        module, matrix = name.rsplit(".", 1)  # layers.N.attention.wq, lora_a
        weight = table.weight(module + ".weight")
        where = peft_module(table, module)
        if matrix == "lora_a":
            tensors[f"{where}.lora_A.weight"] = value.T  # [r, in]
        elif matrix == "lora_b":
            tensors[f"{where}.lora_B.weight"] = hf_rows(value.T, weight, model_config)  # [out, r]
        else:  # DoRA's magnitudes
            tensors[f"{where}.lora_magnitude_vector"] = hf_rows(value, weight, model_config)
    atomic_save_arrays(os.path.join(folder, WEIGHTS), {k: v.astype(mx.float32) for k, v in tensors.items()},
                       metadata={"format": "pt"})
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
                   "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                   "target_modules": [hf_module(table, t) for t in config.targets], "layers_to_transform": layers,
                   "bias": "none", "fan_in_fan_out": fan_in_fan_out(table), "use_rslora": False,
                   "use_dora": config.type == "dora", "inference_mode": True, "modules_to_save": None}
    write_json(os.path.join(folder, CONFIG), peft_config)


def read(folder, model_config):
    """(AdapterConfig, {our name: array}) of a PEFT folder, for a model of `model_config`: every
    key of its configuration and every tensor's name and shape checked, a UserError if not."""
    config_path, weights_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    table = names_of(model_config)
    config = _adapter_config(read_json(config_path, "PEFT adapter configuration"), config_path,
                             model_config["n_layers"], table)
    if not os.path.isfile(weights_path):
        raise UserError(f"{weights_path}: not found (only safetensors PEFT adapters are read)")
    file = SafetensorsFile(weights_path)  # refuses tensors that are not floats
    expected = _expected_tensors(config, model_config, table)
    # Checked in PEFT's names and layout, before any is reordered into ours (what check_fit
    # compares is .shape: no array is read for it).
    check_fit(weights_path, {name: SimpleNamespace(shape=shape) for name, (_, shape) in file.tensors.items()},
              {name: SimpleNamespace(shape=shape) for name, (_, _, shape) in expected.items()}, "adapters")
    arrays = {}
    for name, (module, matrix, _) in expected.items():
        weight = table.weight(module + ".weight")
        value = file.array(name).astype(mx.float32)
        if matrix == "lora_a":
            arrays[f"{module}.lora_a"] = value.T  # [in, r]
        elif matrix == "lora_b":
            arrays[f"{module}.lora_b"] = our_rows(value, weight, model_config).T  # [r, out]
        else:
            arrays[f"{module}.magnitude"] = our_rows(value, weight, model_config)
    return config, arrays


def _expected_tensors(config, model_config, table):
    """{PEFT's tensor name: (our module, our matrix, PEFT's shape)} of the adapters `config` declares."""
    n_layers = model_config["n_layers"]
    expected = {}
    for i in range(config.first_layer(n_layers), n_layers):
        for target in config.targets:
            module = table.target_path(i, target)
            out_dims, in_dims = table.weight(module + ".weight").shape(model_config)
            shapes = {"lora_a": (config.rank, in_dims), "lora_b": (out_dims, config.rank)}
            if config.type == "dora":
                shapes["magnitude"] = (out_dims,)
            expected.update({f"{peft_module(table, module)}.{peft}": (module, ours, shapes[ours])
                             for peft, ours in PEFT_MATRICES.items() if ours in shapes})
    return expected


def _adapter_config(peft, path, n_layers, table):
    """The AdapterConfig of a PEFT configuration, every key it reads checked: a UserError naming the key."""
    for key, value in dict(ONLY, fan_in_fan_out=fan_in_fan_out(table)).items():
        if key in peft and (type(peft[key]) is not type(value) or peft[key] != value):
            raise UserError(f"{path}: '{key}': {peft[key]!r} is not supported (only {json.dumps(value)})")
    for key in EMPTY:
        if peft.get(key) not in (None, {}, []):
            raise UserError(f"{path}: '{key}': per-module ranks, alphas or saved modules are not supported")
    config = AdapterConfig.from_json(
        {"lora_layers": _n_layers_adapted(peft.get("layers_to_transform"), path, n_layers),
         "targets": _targets(peft.get("target_modules"), path, table), "rank": peft.get("r"),
         "alpha": peft.get("lora_alpha"), "dropout": peft.get("lora_dropout", 0.0),
         "fine_tune_type": "dora" if _flag(peft, "use_dora", path) else "lora"}, path, SPELLED)
    if _flag(peft, "use_rslora", path):  # scale alpha / sqrt(r) is ours with alpha * sqrt(r)
        config = dataclasses.replace(config, alpha=config.alpha * config.rank ** 0.5)
    return config


def _flag(peft, key, path):
    """A true-or-false key, false when absent: a string such as "no" must not read as true."""
    value = peft.get(key, False)
    if not isinstance(value, bool):
        raise UserError(f"{path}: '{key}' must be true or false, got {value!r}")
    return value


def _targets(modules, path, table):
    """Our names of PEFT's target_modules (q_proj: wq), each named once: each the end of a module path,
    adapting every linear it ends, as PEFT matches them (GPT-2's c_proj: both)."""
    if not isinstance(modules, list) or not modules:
        raise UserError(f"{path}: 'target_modules' must be a list of module names, got {modules!r}")
    unknown = [m for m in modules if not isinstance(m, str) or not table.matching(m)]
    if unknown:
        raise UserError(f"{path}: 'target_modules': cannot map the modules {', '.join(map(repr, unknown))} "
                        f"(supported: {', '.join(table.hf_linears)})")
    if (twice := repeated(modules)) is not None:
        raise UserError(f"{path}: 'target_modules' names {twice!r} twice")
    adapted = {linear for m in modules for linear in table.matching(m)}
    return [t for t in table.parts if t in adapted]


def _n_layers_adapted(layers, path, n_layers):
    """How many layers layers_to_transform adapts (absent: all): one index or a list of them, each
    once, which must be the model's last ones."""
    if layers is None:
        return n_layers
    where = f"{path}: 'layers_to_transform'"
    indexed = enumerate(layers) if isinstance(layers, list) else [(None, layers)]  # PEFT takes one index alone
    indices = [checked_number(x, int, 0, n_layers - 1, where if i is None else f"{where}[{i}]") for i, x in indexed]
    if not indices:
        raise UserError(f"{where} is empty: it adapts no layer")
    if (twice := repeated(indices)) is not None:
        raise UserError(f"{where} names layer {twice} twice")
    if sorted(indices) != list(range(n_layers - len(indices), n_layers)):
        raise UserError(f"{where}: {indices}: only the last N layers of a model are supported "
                        f"(this one has {n_layers})")
    return len(indices)
