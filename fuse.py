"""Take a fine-tune out of this toolkit: the LoRA adapters folded into the base weights (fused)
and written where other tools read models, or the adapters alone as PEFT's.

    python fuse.py --model M --adapter-file A --save-path OUT [--format mlx|hf|gguf]
                   [--dtype float32|float16|bfloat16] [--de-quantize] [-q --q-bits N --q-group-size G]
    python fuse.py --model M --adapter-file A --peft-path OUT

Formats: `mlx`, a folder lora.py --model reads; `hf`, a Hugging Face folder transformers,
vLLM and TGI load; `gguf`, one file for llama.cpp, Ollama and LM Studio; `--peft-path`,
the adapters as PEFT (and Unsloth, and llama.cpp's convert_lora_to_gguf.py) read them.
A model fused over a quantized base is re-quantized to the base's types unless
--de-quantize or --dtype says otherwise (Hugging Face folders hold floats).

Then the check users never get elsewhere: the export is read back through this toolkit's
reader of its format and run on a probe batch beside the base model with its adapters; the
largest logit difference is printed, with what the export's precision costs on its own.
Beyond that (or beyond float rounding) the export is refused, non-zero, and nothing is
left behind. Everything streams one tensor (one block, for the check) at a time.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Optional

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError, run_script

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import adapters
import convert
import loading
import models
import settings
from formats import QUANT_BITS, QUANT_GROUP_SIZES, gguf, hf, peft
from formats import mlx as mlx_folder
from formats.gguf import kquants
from settings import option

FORMATS = ("mlx", "hf", "gguf")
PROBE_CHUNK = 1 << 24  # float32 values of the output matrix the check widens at once
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. What is ReLU in mlx? It applies the rectified "
              "linear unit, max(x, 0), element by element; arrays, layers and optimizers come with it.")


@dataclass
class FuseSettings(settings.Settings):
    model: str = option(loading.DEFAULT_MODEL,
                        "the base model folder the adapters were trained on (default: the default model)")
    adapter_file: str = option("adapters.npz", "the adapters: a file of lora.py's (with its .json), or a PEFT folder")
    save_path: Optional[str] = option(None, "where the fused model goes: a folder (mlx, hf) or a .gguf file")
    format: str = option("mlx", "mlx: a model folder for lora.py; hf: a Hugging Face folder; gguf: one GGUF file",
                         choices=FORMATS)
    dtype: Optional[str] = option(None, "type of the fused weights; default: the base's (float16 where it was "
                                        "quantized and the format holds floats)", choices=convert.DTYPES)
    de_quantize: bool = option(False, "write a quantized base's fused weights as floats instead of re-quantizing")
    quantize: bool = option(False, "quantize the fused weights (mlx: --q-bits/--q-group-size; gguf: Q4_1 or Q8_0)",
                            flags=["-q"])
    q_bits: int = option(4, "bits per weight for -q", choices=QUANT_BITS)
    q_group_size: int = option(64, "group size for -q (mlx)", choices=QUANT_GROUP_SIZES)
    peft_path: Optional[str] = option(None, "write the adapters alone as a PEFT folder here (no fusing)")
    force: bool = option(False, "replace an existing --save-path or --peft-path")

    def check(self):
        if (self.save_path is None) == (self.peft_path is None):
            raise UserError("give --save-path (a fused model) or --peft-path (the adapters alone), one of them")
        if self.format == "gguf" and self.save_path is not None and not self.save_path.endswith(".gguf"):
            raise UserError(f"--save-path {self.save_path}: a GGUF file's name ends in .gguf")
        if self.quantize and self.de_quantize:
            raise UserError("-q quantizes the fused weights and --de-quantize writes them as floats: give one")
        if self.peft_path is not None and (self.quantize or self.de_quantize or self.dtype is not None):
            raise UserError("--peft-path writes the adapters alone: -q, --de-quantize and --dtype are for a fused "
                            "model (--save-path)")
        if self.format == "gguf" and self.quantize and self.q_bits not in (4, 8):
            raise UserError("--format gguf -q writes Q4_1 (--q-bits 4) or Q8_0 (--q-bits 8)")


# ----------------------------------------------------------------------------- adapters folded in

class Fused:
    """A model folder with LoRA adapters folded into its weights, read as a checkpoint
    (formats/__init__.py): W + (alpha / rank) (A B)^T, summed in float32 (DoRA: its rows rescaled
    to the trained magnitudes, models.folded). With `requantize`,
    a quantized base layer that an adapter changes is held re-quantized to its own group size
    and bits (or GGUF type, where held in GGUF blocks); without, in float32. One no adapter
    touches keeps its exact quantized values."""

    def __init__(self, base, adapter_config, arrays, requantize=True):
        self.base, self.path, self.config, self.shapes = base, base.path, base.config, base.shapes
        self.scale, self.requantize = adapter_config.scale, requantize
        # Full fine-tuning's file holds the trained blocks' own weights: they replace the base's.
        self.replaced = arrays if adapter_config.type == "full" else {}
        # weight key: (A, B, DoRA's magnitudes or None)
        self.deltas = {name.removesuffix(".lora_a") + ".weight": (a, arrays[name.removesuffix("_a") + "_b"],
                                                                  arrays.get(name.removesuffix(".lora_a") + ".magnitude"))
                       for name, a in arrays.items() if name.endswith(".lora_a")}

    def stored_dtype(self, key):
        return self.base.stored_dtype(key)

    def tensor(self, key):
        if key in self.replaced:
            return self.replaced[key].astype(mx.float32)
        w = self.base.tensor(key)
        if key not in self.deltas:
            return w
        return models.folded(w, *self.deltas[key][:2], self.scale, self.deltas[key][2])

    def quantization(self, key):
        if key in self.deltas and not self.requantize:
            return None
        return self.base.quantization(key)

    def quantized(self, key):
        if key not in self.deltas:
            return self.base.quantized(key)
        group_size, bits = self.quantization(key)
        wq, scales, biases = mx.quantize(self.tensor(key), group_size=group_size, bits=bits)
        dtype = self.quantized_scales_dtype(key)
        return wq, scales.astype(dtype), biases.astype(dtype)

    def quantized_scales_dtype(self, key):
        return self.base.quantized_scales_dtype(key)

    def block_type(self, key):
        if key in self.deltas and not self.requantize:
            return None
        return self.base.block_type(key)

    def gguf_blocks(self, key):
        """A base's GGUF blocks as they are; an adapted one's quantized again by kquants' own quantizer."""
        if key not in self.deltas:
            return self.base.gguf_blocks(key)
        return mx.array(kquants.quantized_superblocks(np.asarray(self.tensor(key)), self.block_type(key)))

    def gguf_type(self, key):
        held = self.quantization(key) is not None or self.block_type(key) is not None
        return self.base.gguf_type(key) if held else None

    def write_tokenizer(self, folder):
        self.base.write_tokenizer(folder)


def read_adapters(adapter_file, base):
    """(AdapterConfig, {name: array}) of the adapters, checked to fit the base model."""
    if not os.path.exists(adapter_file):
        raise UserError(f"{adapter_file}: adapter file not found")
    config, arrays = adapters.read(adapter_file, base.config)
    n = base.config["n_layers"]
    if config.layers > n:
        raise UserError(f"{adapter_file}: adapts {config.layers} layers, the model has {n}")
    first = config.first_layer(n)
    if config.type == "full":  # every weight of the trained blocks
        expected = {k: s for k, s in base.shapes.items() if k.startswith("layers.") and int(k.split(".")[1]) >= first}
        utils.check_fit(adapter_file, arrays, {k: _Shape(s) for k, s in expected.items()}, "trained weights")
        return config, arrays
    expected = {}
    for i in range(first, n):
        for target in config.targets:
            path = models.names_of(base.config).target_path(i, target)
            out_dims, in_dims = base.shapes[f"{path}.weight"]
            expected[f"{path}.lora_a"] = (in_dims, config.rank)
            expected[f"{path}.lora_b"] = (config.rank, out_dims)
            if config.type == "dora":
                expected[f"{path}.magnitude"] = (out_dims,)
    utils.check_fit(adapter_file, arrays, {k: _Shape(s) for k, s in expected.items()}, "adapters")
    return config, arrays


class _Shape:
    """What utils.check_fit compares: a shape, without allocating an array of it."""

    def __init__(self, shape):
        self.shape = tuple(shape)


# ----------------------------------------------------------------------------- the check

class AtPrecision:
    """The fused model at the precision an export holds it (cast, or quantized and back, with the
    scales in the export's type): what the export costs on its own, computed without reading it."""

    def __init__(self, fused, precision):
        # {key: ("float", name) | ("quantized", group, bits, mx dtype) | ("gguf", GGUF type)}
        self.fused, self.precision = fused, precision

    def tensor(self, key):
        kind, *how = self.precision[key]
        if kind == "float":
            return self.fused.tensor(key).astype(getattr(mx, how[0])).astype(mx.float32)
        if kind == "gguf":  # the GGUF writer's own blocks: its quantizer is not MLX's
            return gguf.written_values(self.fused, key, how[0])
        group_size, bits, scales_dtype = how
        if self.fused.quantization(key) == (group_size, bits):  # kept as the fused checkpoint holds it
            wq, scales, biases = self.fused.quantized(key)
        else:
            wq, scales, biases = mx.quantize(self.fused.tensor(key).astype(mx.float32), group_size=group_size, bits=bits)
            scales, biases = scales.astype(scales_dtype), biases.astype(scales_dtype)
        return mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits)


def probe_logits(source, config, tokens_BT, adapted=None):
    """Logits [B, T, V] of the model whose weights `source` gives (tensor(key) of a checkpoint),
    computed in float32 one block at a time, so that one block's weights are in memory at a
    time. With `adapted` ((AdapterConfig, {weight key: (A, B, magnitude)})) the adapters run
    as their layers."""
    args = models.model_args(config)
    # The family's model, its own methods run one block at a time; its random initial weights
    # are never evaluated (MLX is lazy), each block's come from `source` just before it runs.
    model = models.build(args)
    # The weights outside the blocks but the output layer (read in slices below): the embeddings
    # (GPT-2's positions' too) and the final norm
    model.update(tree_unflatten([(key, source.tensor(key).astype(mx.float32)) for key, _ in tree_flatten(
        model.parameters()) if not key.startswith(("layers.", "output."))]))
    h_BTD = model.embed(mx.array(tokens_BT))
    masks = model.masks(h_BTD.shape[1], 0)
    for i, block in enumerate(model.layers):
        keys = [f"layers.{i}.{name}" for name, _ in tree_flatten(block.parameters())]
        block.update(tree_unflatten([(key.split(".", 2)[2], source.tensor(key).astype(mx.float32)) for key in keys]))
        if adapted is not None:
            _add_adapters(block, i, *adapted)
        h_BTD = model.run_block(i, block, h_BTD, masks)
        mx.eval(h_BTD)
        model.layers[i] = None  # its weights go before the next block's come
    h_BTD = model.norm(h_BTD)
    output_VD = source.tensor("tok_embeddings.weight" if args.tie_word_embeddings else "output.weight")
    # In slices of the vocabulary: a large one's float32 copy is never whole
    step = max(1, PROBE_CHUNK // args.dim)
    return np.concatenate([np.array(model.final_logits(h_BTD @ output_VD[v:v + step].astype(mx.float32).T))
                           for v in range(0, args.vocab_size, step)], axis=-1)


def _add_adapters(block, i, adapter_config, deltas):
    for key, (a_IR, b_RO, magnitude_O) in deltas.items():
        _, layer, _, name, _ = key.split(".")
        if int(layer) != i:
            continue
        wrapped = models.wrap_linear(block, name, dataclasses.replace(adapter_config, dropout=0.0))
        wrapped.lora_a, wrapped.lora_b = a_IR, b_RO
        if magnitude_O is not None:
            wrapped.magnitude = magnitude_O


def probe_tokens(folder, config):
    """Two short rows of real text through the model's own tokenizer: realistic activations."""
    tokenizer = loading.load_tokenizer(folder, loading.tokenizer_settings(config))
    ids = tokenizer.encode(PROBE_TEXT, bos=True)[:48]
    return [ids[:24], ids[24:48]] if len(ids) >= 48 else [ids]


def check_export(base, fused, exported, precision, adapter_config, folder):
    """Refuse an export that does not behave as the base model with its adapters (see the module
    doc); return the Distances of the export, of its precision alone, and of the base model."""
    tokens = probe_tokens(folder, base.config)
    # The adapters as LoRA layers run them, apart from the fold: its scale is not trusted. Fully
    # fine-tuned blocks have no fold: the trained weights are the adapted model.
    if adapter_config.type == "full":
        adapted = probe_logits(fused, base.config, tokens)
    else:
        adapted = probe_logits(base, base.config, tokens, adapted=(adapter_config, fused.deltas))
    rounding = 1e-4 * max(1.0, float(np.abs(adapted).max()))
    folded = Distance(probe_logits(fused, base.config, tokens), adapted) if fused.deltas else None
    if folded is not None and folded.largest > rounding:
        raise UserError(f"{folder}: the adapters folded into the weights do not give the adapted model's logits "
                        f"(largest difference {folded.largest:.3g})")
    cost = Distance(probe_logits(AtPrecision(fused, precision), base.config, tokens), adapted)
    export = Distance(probe_logits(exported, exported.config, tokens), adapted)
    # Both the largest and the mean difference: quantization noise can hide a lost fine-tune in the first.
    if export.largest > 1.5 * cost.largest + rounding or export.mean > 1.5 * cost.mean + rounding:
        raise UserError(f"the export's logits are {export} from the adapted model's, beyond what its "
                        f"precision costs ({cost}): not written")
    return export, cost, Distance(probe_logits(base, base.config, tokens), adapted)


class Distance:
    """How far one model's probe logits are from another's: largest and mean absolute difference."""

    def __init__(self, logits, reference):
        difference = np.abs(logits - reference)
        self.largest, self.mean = float(difference.max()), float(difference.mean())

    def __str__(self):
        return f"{self.largest:.3g} (mean {self.mean:.2g})"


# ----------------------------------------------------------------------------- exports

def precision_of_plan(plan):
    return {key: ("float", plan.dtype[key]) if plan.how[key] == "copy"
            else ("gguf", plan.blocks[key]) if plan.how[key] == "blocks"
            else ("quantized", *plan.q[key], plan.scales_dtype(key)) for key in plan.checkpoint.shapes}


def export_mlx(fused, args, out):
    """A model folder lora.py --model reads; (reader of the export, its precision)."""
    dtype = args.dtype or ("float16" if args.de_quantize else None)
    plan = convert.Plan(fused, dtype, (args.q_group_size, args.q_bits) if args.quantize else None)
    convert.write_folder(plan, out)
    return mlx_folder.Checkpoint(out), precision_of_plan(plan)


def export_hf(fused, args, out):
    """A Hugging Face folder: floats only (transformers cannot read MLX's quantization)."""
    if args.quantize:
        raise UserError("--format hf holds floats: drop -q (or use --format mlx or gguf)")
    stored = {fused.stored_dtype(key) for key in fused.shapes} - {None}
    dtype = args.dtype or (stored.pop() if len(stored) == 1 and not _quantized(fused) else "float16")
    hf.write(fused, out, dtype)
    return hf.Checkpoint(out), {key: ("float", dtype) for key in fused.shapes}


def export_gguf(fused, args, out):
    """One GGUF file: the base's quantized layers re-quantized to their GGUF types."""
    types = gguf.tensor_types(fused, args.dtype or ("float16" if args.de_quantize else None),
                              args.q_bits if args.quantize else None)
    gguf.write(fused, out, types)
    precision = {key: ("float", gguf.FLOAT_DTYPES[t]) if t in gguf.FLOAT_DTYPES else ("gguf", t)
                 for key, t in types.items()}
    return gguf.Checkpoint(out), precision


EXPORTS = {"mlx": export_mlx, "hf": export_hf, "gguf": export_gguf}


def _quantized(checkpoint):
    return any(checkpoint.quantization(key) is not None or checkpoint.block_type(key) for key in checkpoint.shapes)


def fuse(args):
    """Fold, export into a temporary place, check, and only then put the export in place."""
    base = mlx_folder.Checkpoint(args.model)
    adapter_config, arrays = read_adapters(args.adapter_file, base)
    # Re-quantized to the base's types unless --dtype or --de-quantize asks for floats
    fused = Fused(base, adapter_config, arrays, requantize=args.dtype is None and not args.de_quantize)
    target = args.save_path
    _check_free(target, args.force)
    replaced = (utils.file_replaced_when_done(target, suffix=".gguf") if args.format == "gguf"
                else utils.folder_replaced_when_done(target))
    with utils.claimed_output(target), replaced as tmp:
        exported, precision = EXPORTS[args.format](fused, args, tmp)
        report(*check_export(base, fused, exported, precision, adapter_config, args.model))
    print(f"wrote {target} ({args.format})", file=sys.stderr)


def report(export, cost, base):
    print(f"check: largest logit difference from the base model with its adapters {export}; its precision "
          f"alone costs {cost}; the adapters move the base model's logits by {base}", file=sys.stderr)


def write_peft(args):
    """The adapters alone, as a PEFT folder; read back, they must be the same numbers."""
    base = mlx_folder.Checkpoint(args.model)
    adapter_config, arrays = read_adapters(args.adapter_file, base)
    if adapter_config.type == "full":
        raise UserError(f"{args.adapter_file}: fully fine-tuned weights are no adapters: export them with --save-path")
    _check_free(args.peft_path, args.force)
    with utils.claimed_output(args.peft_path), utils.folder_replaced_when_done(args.peft_path) as tmp:
        peft.write(tmp, adapter_config, arrays, base.config, os.path.basename(os.path.abspath(args.model)))
        _, back = peft.read(tmp, base.config)
        for name, value in arrays.items():
            if not np.array_equal(np.array(back[name]), np.array(value.astype(mx.float32))):
                raise UserError(f"{args.peft_path}: {name} did not survive the round trip: not written")
    print(f"wrote {args.peft_path} (PEFT: r {adapter_config.rank}, alpha {adapter_config.alpha}, "
          f"{', '.join(peft.hf_module(models.names_of(base.config), t) for t in adapter_config.targets)} of the last "
          f"{adapter_config.layers} layers)", file=sys.stderr)


def _check_free(path, force):
    """An existing output is replaced only with --force, and never a file by a folder or back."""
    if os.path.exists(path) and not force:
        raise UserError(f"{path}: exists (use --force to replace it)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{parent}: parent folder of the output does not exist")


def main(argv=None):
    args = settings.parse(FuseSettings, argv, "Fold LoRA adapters into their base model and export it, "
                                              "or write the adapters alone as PEFT's.")
    if not os.path.isdir(args.model):
        raise UserError(f"{args.model}: model folder not found")
    # Every buffer is used once, tensor after tensor: freed ones go back to the OS, not to
    # MLX's cache, or the cache would grow to hold the model (ops.py sets it for training)
    cache_limit = mx.set_cache_limit(0)
    try:
        if args.peft_path is not None:
            write_peft(args)
        else:
            fuse(args)
    finally:
        mx.set_cache_limit(cache_limit)


if __name__ == "__main__":
    run_script(main)
