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

from formats.hf import LAYER_NAMES, interleaved_rope_rows, split_rope_halves
from formats.safetensors import SafetensorsFile

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
# Each adaptable linear's Hugging Face path in a block, and back: from formats.hf's one table.
HF_PATHS = {ours.split(".")[1]: hf for hf, ours in LAYER_NAMES.items() if "." in ours}  # wq: self_attn.q_proj
HF_MODULES = {ours: hf.split(".")[1] for ours, hf in HF_PATHS.items()}                  # wq: q_proj
OUR_MODULES = {hf: ours for ours, hf in HF_MODULES.items()}


def is_peft_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def hf_rows(out_O_, name, config):
    """Rows of output features [out, ...] in Hugging Face's order (queries and keys)."""
    if name in ("wq", "wk"):
        heads = config["n_heads"] if name == "wq" else config["n_kv_heads"]
        return split_rope_halves(out_O_, heads)
    return out_O_


def our_rows(out_O_, name, config):
    """Rows of output features [out, ...] from Hugging Face's order (queries and keys) to ours."""
    if name in ("wq", "wk"):
        heads = config["n_heads"] if name == "wq" else config["n_kv_heads"]
        return interleaved_rope_rows(out_O_, heads)
    return out_O_


def write(folder, lora, arrays, model_config, base_model_name):
    """Write adapters (this toolkit's names and layout) as a PEFT folder."""
    n_layers = model_config["n_layers"]
    layers = list(range(n_layers - lora["lora_layers"], n_layers))
    tensors = {}
    for name, value in arrays.items():
        _, i, _, module, matrix = name.split(".")  # layers.N.attention.wq.lora_a
        where = f"{PREFIX}.{i}.{HF_PATHS[module]}"
        if matrix == "lora_a":
            tensors[f"{where}.lora_A.weight"] = value.T  # [r, in]
        elif matrix == "lora_b":
            tensors[f"{where}.lora_B.weight"] = hf_rows(value.T, module, model_config)  # [out, r]
        else:  # DoRA's magnitudes
            tensors[f"{where}.lora_magnitude_vector"] = hf_rows(value[:, None], module, model_config)[:, 0]
    mx.save_safetensors(os.path.join(folder, WEIGHTS), {k: v.astype(mx.float32) for k, v in tensors.items()},
                        metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora.get("dropout", 0.0),
              "target_modules": [HF_MODULES[t] for t in lora["targets"]], "layers_to_transform": layers,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": lora.get("fine_tune_type") == "dora",
              "inference_mode": True, "modules_to_save": None}
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read(folder, model_config):
    """(lora config, {our name: array}) of a PEFT folder, for a model of `model_config`."""
    config_path, weights_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    peft = read_json(config_path, "PEFT adapter configuration")
    lora = _lora_config(peft, config_path, model_config["n_layers"])
    if not os.path.isfile(weights_path):
        raise UserError(f"{weights_path}: not found (only safetensors PEFT adapters are read)")
    file = SafetensorsFile(weights_path)
    arrays = {}
    for name in file.tensors:
        ours = _our_name(name, weights_path)
        value = file.array(name).astype(mx.float32)
        module = ours.split(".")[3]
        if ours.endswith("lora_a"):
            arrays[ours] = value.T  # [in, r]
        elif ours.endswith("lora_b"):
            arrays[ours] = our_rows(value, module, model_config).T  # [r, out]
        else:
            arrays[ours] = our_rows(value[:, None], module, model_config)[:, 0]
    return lora, arrays


def _our_name(name, path):
    parts = name.split(".")
    # base_model.model.model.layers.N.(self_attn|mlp).MODULE.(lora_A.weight|lora_B.weight|lora_magnitude_vector)
    tail = ".".join(parts[7:])
    if (len(parts) < 8 or ".".join(parts[:4]) != PREFIX or not parts[4].isdigit()
            or f"{parts[5]}.{parts[6]}" not in LAYER_NAMES or tail not in PEFT_MATRICES):
        raise UserError(f"{path}: cannot map '{name}' onto this toolkit's model (it adapts LoRA or DoRA on the "
                        f"linears {', '.join(OUR_MODULES)} of the layers)")
    return f"layers.{int(parts[4])}.{LAYER_NAMES[f'{parts[5]}.{parts[6]}']}.{PEFT_MATRICES[tail]}"


PEFT_MATRICES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "magnitude"}


def _lora_config(peft, path, n_layers):
    """This toolkit's LoRA configuration of a PEFT one, or a UserError for what it cannot hold."""
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
    unknown = [t for t in targets if t not in OUR_MODULES]
    if unknown:
        raise UserError(f"{path}: cannot map the modules {', '.join(map(repr, unknown))} (supported: "
                        f"{', '.join(OUR_MODULES)})")
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
    return {"lora_layers": len(layers), "targets": [OUR_MODULES[t] for t in sorted(targets, key=_target_order)],
            "rank": rank, "alpha": float(alpha), "dropout": float(peft.get("lora_dropout") or 0.0),
            "fine_tune_type": "dora" if peft.get("use_dora") else "lora"}


def _target_order(hf_module):
    return list(OUR_MODULES).index(hf_module)
