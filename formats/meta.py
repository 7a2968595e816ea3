"""Meta's and Mistral's original checkpoint folders: params.json with consolidated.NN.pth
shards, or one consolidated.safetensors (Mistral's newer downloads), and tokenizer.model.

The format of LLaMA 1/2/3, Code Llama and Mistral downloads. Shards of Meta's model
parallelism are merged (each weight split along its `meta_split` axis, models.NAMES); the names
of the tensors are already this toolkit's. Shards are memory-mapped, and every
shape is checked against params.json before a tensor is read. tokenizer.model is
SentencePiece (LLaMA 1/2, Mistral) or, from Llama 3 on, a tiktoken rank file.
"""

import glob
import math
import os
from collections import namedtuple

from utils import UserError, read_json

from models import NAMES, checked_shapes
from formats.safetensors import SafetensorsFile
from formats.torch_files import dtype_name, load_state_dict, to_mx
from tokenizer import is_tiktoken_file, llama3_special_tokens

# Llama 3.1's RoPE scaling, as Meta's reference code applies it when params.json says use_scaled_rope.
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
Entry = namedtuple("Entry", "shape dtype")  # what the checks need of a tensor in a safetensors file


def detect(folder):
    """Whether `folder` holds a checkpoint of this format."""
    return os.path.isdir(folder) and bool(glob.glob(os.path.join(folder, "consolidated.*.pth"))
                                          or os.path.isfile(os.path.join(folder, "consolidated.safetensors")))


class Checkpoint:
    """An opened, fully checked Meta or Mistral checkpoint folder (see formats/__init__.py)."""

    def __init__(self, folder):
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: checkpoint folder not found")
        self.path = folder
        params_path = os.path.join(folder, "params.json")
        params = read_json(params_path, "params.json")
        self.tokenizer_path = os.path.join(folder, "tokenizer.model")
        if not os.path.isfile(self.tokenizer_path):
            raise UserError(f"{self.tokenizer_path}: tokenizer.model not found")
        self.file = None
        if glob.glob(os.path.join(folder, "consolidated.*.pth")):
            self.shards = open_shards(folder)
        else:
            self.file = SafetensorsFile(os.path.join(folder, "consolidated.safetensors"))
            self.shards = [(self.file.path, {k: Entry(shape, dtype) for k, (dtype, shape) in self.file.tensors.items()})]
        self.config = derive_config(params, params_path, self.shards)
        self.config.update(self._tokenizer_config())
        self.shapes = checked_shapes(self.config, params_path)
        check_shards(self.shards, self.shapes)

    def _tokenizer_config(self):
        """BOS and end tokens: SentencePiece's come with the model file, Llama 3's with its specials."""
        if not is_tiktoken_file(self.tokenizer_path):
            return {}
        specials = llama3_special_tokens(self.tokenizer_path)
        ends = [specials[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if t in specials]
        return {"bos_token_id": specials["<|begin_of_text|>"], "eos_token_ids": ends, "add_bos_token": True}

    def stored_dtype(self, key):
        return _dtype(self.shards[0][1][key])

    def tensor(self, key):
        if self.file is not None:
            return self.file.array(key)
        return to_mx(merged(key, self.shards))

    def quantization(self, key):
        return None  # these formats hold floats only

    def quantized(self, key):
        raise AssertionError("Meta checkpoints hold no quantized weights")

    def write_tokenizer(self, folder):
        import shutil

        shutil.copyfile(self.tokenizer_path, os.path.join(folder, "tokenizer.model"))


def _dtype(tensor):
    return tensor.dtype if isinstance(tensor, Entry) else dtype_name(tensor)


def open_shards(folder):
    """Memory-map every consolidated.NN.pth; refuse anything that is not plain tensors."""
    paths = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    for n, path in enumerate(paths):
        if os.path.basename(path) != f"consolidated.{n:02d}.pth":
            raise UserError(f"{os.path.join(folder, f'consolidated.{n:02d}.pth')}: shard missing "
                            f"(found {len(paths)} shards up to {os.path.basename(paths[-1])})")
    return [(path, load_state_dict(path)) for path in paths]


def _param(params, name, path, kind=int, default=None):
    """params[name], checked to be a positive int (or number); `default` when absent."""
    if name not in params and default is not None:
        return default
    if name not in params:
        raise UserError(f"{path}: missing '{name}'")
    value = params[name]
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or value <= 0:
        raise UserError(f"{path}: '{name}' must be a positive {'number' if kind is float else 'integer'}, "
                        f"got {value!r}")
    return kind(value)


def llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's FeedForward size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def derive_config(params, params_path, shards):
    """The output config: params.json's values, the rest read off shard 00's shapes (checked later)."""
    dim, n_layers, n_heads = (_param(params, k, params_path) for k in ("dim", "n_layers", "n_heads"))
    if "head_dim" in params:
        head_dim = _param(params, "head_dim", params_path)
    elif dim % n_heads:
        raise UserError(f"{params_path}: dim {dim} is not divisible by n_heads {n_heads}")
    else:
        head_dim = dim // n_heads
    n_shards = len(shards)
    path0, sd0 = shards[0]

    def merged_rows(key):
        if key not in sd0:
            raise UserError(f"{path0}: missing key '{key}'")
        return sd0[key].shape[0] * n_shards  # wk and w1: split along rows

    if "n_kv_heads" in params:
        n_kv_heads = _param(params, "n_kv_heads", params_path)
    else:  # LLaMA 1/2 params omit it: read it off wk (checked for every layer later)
        kv_rows = merged_rows("layers.0.attention.wk.weight")
        if kv_rows % head_dim or kv_rows == 0:
            raise UserError(f"{path0}: layers.0.attention.wk.weight has {kv_rows} rows, "
                            f"not a multiple of head_dim {head_dim}")
        n_kv_heads = kv_rows // head_dim
    if n_heads % n_kv_heads:
        raise UserError(f"{params_path}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    hidden_dim = merged_rows("layers.0.feed_forward.w1.weight")
    if "hidden_dim" in params:
        if params["hidden_dim"] != hidden_dim:
            raise UserError(f"{path0}: layers.0.feed_forward.w1.weight has {hidden_dim} rows but "
                            f"{params_path} says hidden_dim {params['hidden_dim']}")
    elif "multiple_of" in params:
        multiplier = params.get("ffn_dim_multiplier")
        if multiplier is not None:
            multiplier = _param(params, "ffn_dim_multiplier", params_path, float)
        expected = llama_hidden_dim(dim, _param(params, "multiple_of", params_path), multiplier)
        if expected != hidden_dim:
            raise UserError(f"{path0}: layers.0.feed_forward.w1.weight has {hidden_dim} rows but "
                            f"{params_path} (multiple_of, ffn_dim_multiplier) gives hidden_dim {expected}")
    if "tok_embeddings.weight" not in sd0:
        raise UserError(f"{path0}: missing key 'tok_embeddings.weight'")
    vocab_size = sd0["tok_embeddings.weight"].shape[0]
    if params.get("vocab_size", -1) not in (-1, vocab_size):  # LLaMA writes -1: "from the tokenizer"
        raise UserError(f"{path0}: tok_embeddings.weight has {vocab_size} rows but "
                        f"{params_path} says vocab_size {params['vocab_size']}")
    window = params.get("sliding_window")  # Mistral; null or absent: full causal attention
    config = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "head_dim": head_dim, "hidden_dim": hidden_dim,
              "norm_eps": _param(params, "norm_eps", params_path, float, default=1e-5),
              "vocab_size": vocab_size,
              "rope_theta": _param(params, "rope_theta", params_path, float, default=10000.0),
              "sliding_window": None if window is None else _param(params, "sliding_window", params_path)}
    if "max_seq_len" in params:  # llama2.c's exports say it; Meta's and Mistral's do not
        config["context_length"] = _param(params, "max_seq_len", params_path)
    if params.get("use_scaled_rope"):  # Llama 3.1 and later
        factor = _param(params, "rope_scaling_factor", params_path, float, default=LLAMA3_ROPE_SCALING["factor"])
        config["rope_scaling"] = dict(LLAMA3_ROPE_SCALING, factor=factor)
    return config


def check_shards(shards, shapes):
    """Every shard holds exactly the expected keys, each with its slice's shape; replicas agree."""
    n = len(shards)
    for path, sd in shards:
        keys = set(sd) - {"rope.freqs"}  # old LLaMA checkpoints: RoPE frequencies, not a weight
        for key in sorted(set(shapes) - keys):
            raise UserError(f"{path}: missing key '{key}' (expected from params.json)")
        for key in sorted(keys - set(shapes)):
            raise UserError(f"{path}: unexpected key '{key}' (does params.json match these weights?)")
        for key, shape in shapes.items():
            tensor, want = sd[key], list(shape)
            axis = split_axis(key)
            if axis is not None:
                if want[axis] % n:
                    raise UserError(f"{path}: {key}: size {want[axis]} cannot be split over {n} shards")
                want[axis] //= n
            if tuple(tensor.shape) != tuple(want):
                raise UserError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(want)} "
                                f"from params.json{f' (1/{n} of {shape})' if n > 1 and axis is not None else ''}")
            if _dtype(tensor) is None:
                raise UserError(f"{path}: {key} has dtype {tensor.dtype}, expected a float type")
    first_path, first = shards[0]
    for path, sd in shards[1:]:  # replicated tensors (norms) are small: compare them now
        for key in shapes:
            if split_axis(key) is None and not sd[key].equal(first[key]):
                raise UserError(f"{path}: {key} differs from {os.path.basename(first_path)}; "
                                "replicated tensors must be identical in every shard")


def split_axis(key):
    """The axis Meta's model parallelism splits weight `key` along across shards; None: replicated."""
    return NAMES.weight(key).meta_split


def merged(key, shards):
    """The full torch tensor for `key`: each shard's slice is copied straight into place."""
    import torch

    pieces = [sd[key] for _, sd in shards]
    axis = split_axis(key)
    if axis is None or len(pieces) == 1:
        return pieces[0]  # memory-mapped: read as it is written out
    shape = list(pieces[0].shape)
    shape[axis] = sum(p.shape[axis] for p in pieces)
    full = torch.empty(shape, dtype=pieces[0].dtype)
    offset = 0
    for p in pieces:
        full.narrow(axis, offset, p.shape[axis]).copy_(p)  # reads the mapped pages once
        offset += p.shape[axis]
    return full
