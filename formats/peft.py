"""PEFT's LoRA adapter folders (adapter_config.json and adapter_model.safetensors): what PEFT,
Unsloth and llama.cpp's convert_lora_to_gguf.py read and write.

PEFT names a LoRA's matrices after the Hugging Face module they adapt
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`) and stores them
transposed against this toolkit's: its lora_A is [r, in] (our A is [in, r]) and its
lora_B is [out, r] (our B is [r, out]); the update is (lora_alpha / r) B A, ours
(alpha / rank) (A B)^T: the same. The query and key rows of lora_B are in Hugging
Face's order, which keeps the two halves of every RoPE pair apart; ours are Meta's.
DoRA adds a magnitude per output row (`...q_proj.lora_magnitude_vector`, [out]), in the
same row order as lora_B.
"""

import json
import os

from utils import UserError, read_json

import mlx.core as mx

from formats.hf import hf_rows, our_rows
from formats.safetensors import SafetensorsFile
from models import NAMES, AdapterConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # before the Hugging Face name of the module adapted
# PEFT's names of the arrays of an adapted module, and ours.
PEFT_MATRICES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "magnitude"}


def is_peft_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def hf_module(linear):
    """The Hugging Face module name of one of a block's linears, as PEFT's target_modules spell it: q_proj."""
    return NAMES.rename(NAMES.target_path(0, linear) + ".weight", "ours", "hf").split(".")[-2]


def write(folder, config: AdapterConfig, arrays, model_config, base_model_name):
    """Write adapters (this toolkit's names and layout) as a PEFT folder."""
    n_layers = model_config["n_layers"]
    layers = list(range(config.first_layer(n_layers), n_layers))
    tensors = {}
    for name, value in arrays.items():
        module, matrix = name.rsplit(".", 1)  # layers.N.attention.wq, lora_a
        weight = NAMES.weight(module + ".weight")
        where = PREFIX + NAMES.rename(module + ".weight", "ours", "hf").removesuffix(".weight")
        if matrix == "lora_a":
            tensors[f"{where}.lora_A.weight"] = value.T  # [r, in]
        elif matrix == "lora_b":
            tensors[f"{where}.lora_B.weight"] = hf_rows(value.T, weight, model_config)  # [out, r]
        else:  # DoRA's magnitudes
            tensors[f"{where}.lora_magnitude_vector"] = hf_rows(value, weight, model_config)
    mx.save_safetensors(os.path.join(folder, WEIGHTS), {k: v.astype(mx.float32) for k, v in tensors.items()},
                        metadata={"format": "pt"})
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
                   "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                   "target_modules": [hf_module(t) for t in config.targets], "layers_to_transform": layers,
                   "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": config.type == "dora",
                   "inference_mode": True, "modules_to_save": None}
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(peft_config, f, indent=2)


def read(folder, model_config):
    """(AdapterConfig, {our name: array}) of a PEFT folder, for a model of `model_config`."""
    config_path, weights_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    peft = read_json(config_path, "PEFT adapter configuration")
    config = _adapter_config(peft, config_path, model_config["n_layers"])
    if not os.path.isfile(weights_path):
        raise UserError(f"{weights_path}: not found (only safetensors PEFT adapters are read)")
    file = SafetensorsFile(weights_path)
    arrays = {}
    for name in file.tensors:
        module, matrix = _our_name(name, weights_path)
        weight = NAMES.weight(module + ".weight")
        value = file.array(name).astype(mx.float32)
        if matrix == "lora_a":
            arrays[f"{module}.lora_a"] = value.T  # [in, r]
        elif matrix == "lora_b":
            arrays[f"{module}.lora_b"] = our_rows(value, weight, model_config).T  # [r, out]
        else:
            arrays[f"{module}.magnitude"] = our_rows(value, weight, model_config)
    return config, arrays


def _our_name(name, path):
    """(our module path, our matrix name) of a PEFT tensor name:
    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight -> (layers.N.attention.wq, lora_a)."""
    matrix = next((m for m in PEFT_MATRICES if name.endswith("." + m)), None)
    hf = name[len(PREFIX):-len(matrix) - 1] + ".weight" if name.startswith(PREFIX) and matrix else None
    weight = None if hf is None else NAMES.weight(hf, "hf")
    if weight is None or not weight.linear or not hf.startswith("model.layers."):
        raise UserError(f"{path}: cannot map '{name}' onto this toolkit's model (it adapts LoRA or DoRA on the "
                        f"linears {', '.join(map(hf_module, NAMES.parts))} of the layers)")
    return NAMES.rename(hf, "hf", "ours").removesuffix(".weight"), PEFT_MATRICES[matrix]


def _adapter_config(peft, path, n_layers):
    """The AdapterConfig of a PEFT configuration, or a UserError for what it cannot hold."""
    if peft.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {peft.get('peft_type')!r} is not LORA")
    for key, unsupported in (("bias", ("all", "lora_only")), ("fan_in_fan_out", True)):
        if peft.get(key) == unsupported or (isinstance(unsupported, tuple) and peft.get(key) in unsupported):
            raise UserError(f"{path}: '{key}': {peft.get(key)!r} is not supported")
    if peft.get("rank_pattern") or peft.get("alpha_pattern") or peft.get("modules_to_save"):
        raise UserError(f"{path}: per-module ranks, alphas or saved modules are not supported")
    targets = peft.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list) or not targets:
        raise UserError(f"{path}: 'target_modules' must be a list of module names, got {targets!r}")
    ours = {hf_module(t): t for t in NAMES.parts}  # q_proj: wq
    unknown = [t for t in targets if t not in ours]
    if unknown:
        raise UserError(f"{path}: cannot map the modules {', '.join(map(repr, unknown))} (supported: "
                        f"{', '.join(ours)})")
    layers = peft.get("layers_to_transform")
    if layers is None:
        layers = list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    if sorted(layers) != list(range(n_layers - len(layers), n_layers)):
        raise UserError(f"{path}: adapts the layers {layers}: only the last N layers of a model are supported")
    rank, alpha = peft.get("r"), peft.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(alpha, (int, float)):
        raise UserError(f"{path}: 'r' and 'lora_alpha' must be a positive integer and a number")
    if peft.get("use_rslora"):  # scale alpha / sqrt(r) is ours with alpha * sqrt(r)
        alpha = alpha * rank ** 0.5
    return AdapterConfig(layers=len(layers), targets=tuple(t for t in NAMES.parts if hf_module(t) in targets),
                         rank=rank, alpha=float(alpha), dropout=float(peft.get("lora_dropout") or 0.0),
                         type="dora" if peft.get("use_dora") else "lora")
