"""This toolkit's own model folders (what convert.py, pretrain.py and fuse.py write), read as a
checkpoint: config.json, weights.npz or weights.safetensors, the tokenizer's files and the
chat template.

Read through the same interface as every other format (formats/__init__.py), so that a model
folder can be converted again (quantized, say) and fuse.py can export it; its weights are
memory-mapped by MLX and read one at a time.
"""

import os
import shutil

import mlx.core as mx

import models
import ops
from utils import UserError, load_arrays, read_json

# What a model folder holds besides its weights and config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
# config.json's {weight: ggml type} of the weights kept quantized as a GGUF file held them ("Q4_K"),
# so that fuse.py --format gguf writes each back in its type
GGUF_TYPES = "gguf_types"
# The key of a linear held in a GGUF file's own blocks, in config.json's quantization block:
# {"layers.0.feed_forward.w2": {"gguf_type": "Q6_K"}}, its weights.npz array `<module path>.blocks`
GGUF_TYPE = "gguf_type"


def gguf_types_entry(checkpoint, kept):
    """config.json's GGUF_TYPES entry for the weights `kept` in the checkpoint's own quantization:
    {} when the checkpoint does not say (formats other than GGUF and this one)."""
    source = getattr(checkpoint, "gguf_type", None)
    types = {key: source(key) for key in kept} if source else {}
    types = {key: t for key, t in types.items() if t is not None}
    return {GGUF_TYPES: types} if types else {}


def checked_gguf_types(raw, config_path):
    types = raw.get(GGUF_TYPES, {})
    if not (isinstance(types, dict) and all(isinstance(t, str) for t in types.values())):
        raise UserError(f"{config_path}: '{GGUF_TYPES}' must map weight names to ggml type names, got {types!r:.80}")
    return types


def detect(path):
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and any(os.path.isfile(os.path.join(path, f"weights.{ext}")) for ext in ("npz", "safetensors")))


class Checkpoint:
    """An opened model folder of this toolkit (see formats/__init__.py for the interface)."""

    def __init__(self, folder):
        import loading

        self.path = folder
        config_path = os.path.join(folder, "config.json")
        raw = read_json(config_path, "model configuration")
        args = models.model_args(raw, config_path)  # every key checked
        self.config = {key: value for key, value in vars(args).items() if value is not None or key in raw}
        self.config.update(loading.tokenizer_settings(raw, config_path))
        self._quantization = loading.quantization(raw, config_path) or {}
        self._block_types = loading.block_types(raw, config_path)
        self._gguf_types = checked_gguf_types(raw, config_path)
        self.shapes = models.names_of(self.config).shapes(self.config)
        self.weights_path = loading.weights_file(folder)
        self._unread = load_arrays(self.weights_path)  # lazy: nothing is read until asked for
        self._arrays = {name: (a.shape, a.dtype) for name, a in self._unread.items()}  # what the file holds
        for key, shape in self.shapes.items():
            stored, expected = self._stored_name(key), self._stored_shape(key, shape)
            if stored not in self._arrays:
                raise UserError(f"{self.weights_path}: no {stored}")
            if expected is not None and tuple(self._arrays[stored][0]) != expected:
                raise UserError(f"{self.weights_path}: {stored} has shape {tuple(self._arrays[stored][0])}, "
                                f"expected {expected}")

    def _base(self, key):
        return key.removesuffix(".weight")

    def _stored_name(self, key):
        """The array holding the weight: its blocks, or the weight (packed, where quantized)."""
        return f"{self._base(key)}.blocks" if self.block_type(key) else key

    def _stored_shape(self, key, shape):
        """The shape that array must have; None where quantized (mx.quantize's packing decides)."""
        if self.block_type(key):
            values, nbytes = ops.BLOCK_TYPES[self.block_type(key)]
            return shape[0], shape[1] // values * nbytes
        return None if self.quantization(key) is not None else tuple(shape)

    def stored_dtype(self, key):
        if self.quantization(key) is not None or self.block_type(key):
            return None
        return str(self._arrays[key][1]).removeprefix("mlx.core.")

    def _read(self, name):
        """One array, handed over and forgotten here: an array once evaluated keeps its data as
        long as it is referenced, so keeping the read ones would end with the whole model in
        memory. The file is loaded (lazily) again only for an array asked for a second time:
        once a pass over the model, not once an array."""
        if name not in self._unread:
            self._unread = load_arrays(self.weights_path)
        return self._unread.pop(name)

    def tensor(self, key):
        if self.block_type(key):
            return ops.dequantize_blocks(self.gguf_blocks(key), self.block_type(key))
        q = self.quantization(key)
        if q is None:
            return self._read(key)
        weight, scales, biases = self.quantized(key)
        return mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32),
                             group_size=q[0], bits=q[1])

    def quantization(self, key):
        if f"{self._base(key)}.scales" not in self._arrays:
            return None
        return self._quantization.get(self._base(key), self._quantization.get(None))

    def quantized(self, key):
        base = self._base(key)
        return self._read(key), self._read(f"{base}.scales"), self._read(f"{base}.biases")

    def quantized_scales_dtype(self, key):
        return self._arrays[f"{self._base(key)}.scales"][1]

    def block_type(self, key):
        """The GGUF type whose blocks hold the weight as the file held them (a BlockQuantizedLinear), or None."""
        return self._block_types.get(self._base(key))

    def gguf_blocks(self, key):
        """Those blocks, uint8 [rows, cols / values * bytes] (ops.BLOCK_TYPES)."""
        return self._read(f"{self._base(key)}.blocks")

    def gguf_type(self, key):
        """The ggml type the GGUF file this folder was converted from held the weight in, while it is
        held in that file's quantization or blocks; else None."""
        if self.block_type(key):
            return self.block_type(key)
        return self._gguf_types.get(key) if self.quantization(key) is not None else None

    def write_tokenizer(self, folder):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(self.path, name)):
                shutil.copyfile(os.path.join(self.path, name), os.path.join(folder, name))
