"""LoRA and DoRA layers, their configuration, and how they wrap a model's linears.

Shapes: I a linear's input features, O its output features, R the rank.
"""

import dataclasses
import math
from dataclasses import dataclass

import utils  # fast BLAS before mlx.core
from utils import UserError

import mlx.core as mx
import mlx.nn as nn

import ops
from models.layers import BlockQuantizedLinear

# What --fine-tune-type chooses: the layer that wraps each target, or, for full, none (the
# blocks' own weights train).
ADAPTER_TYPES = ("lora", "dora", "full")


@dataclass(frozen=True)
class AdapterConfig:
    """What adapts a model, saved beside the adapters (their .json) so that they can be restored."""
    layers: int = 16                   # the last `layers` blocks are adapted (fewer if the model has fewer)
    targets: tuple = ("wq", "wv")      # linears of each block: ours (a NameTable's parts), or as given
                                       # (Hugging Face's names, 'all') until apply_lora resolves them
    rank: int = 8
    alpha: float = 16.0                # the update is scaled by alpha / rank
    dropout: float = 0.0               # on the adapters' input, in training
    type: str = "lora"                 # one of ADAPTER_TYPES

    @property
    def scale(self):
        return self.alpha / self.rank

    def first_layer(self, n_layers):
        return max(0, n_layers - self.layers)

    def to_json(self):
        """The adapter file's .json: the keys it has always had."""
        return {"lora_layers": self.layers, "targets": list(self.targets), "rank": self.rank, "alpha": self.alpha,
                "dropout": self.dropout, "fine_tune_type": self.type}

    @classmethod
    def from_json(cls, config, where, spelled=None):
        """The configuration a file holds, every key checked; a UserError naming `where` if not.
        `spelled` names a key as the file does where that is not ours (PEFT's "r" for "rank")."""
        def key(name):
            return f"'{(spelled or {}).get(name, name)}'"

        if not isinstance(config, dict):
            raise UserError(f"{where}: bad adapter configuration (expected an object, got {config!r})")
        missing = [k for k in ("lora_layers", "targets", "rank", "alpha") if k not in config]
        if missing:
            raise UserError(f"{where}: bad adapter configuration (no {key(missing[0])})")
        targets = config["targets"]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise UserError(f"{where}: {key('targets')} must be a list of linear names, got {str(targets)[:200]}")
        if (twice := utils.repeated(targets)) is not None:
            raise UserError(f"{where}: {key('targets')} names {twice!r} twice")
        kind = config.get("fine_tune_type", "lora")
        if kind not in ADAPTER_TYPES:
            raise UserError(f"{where}: {key('fine_tune_type')} must be one of {', '.join(ADAPTER_TYPES)}, "
                            f"got {kind!r}")

        def number(name, as_type, low, high):  # only dropout may be absent (0): the others were checked above
            return utils.checked_number(config.get(name, 0.0), as_type, low, high, f"{where}: {key(name)}")

        return cls(layers=number("lora_layers", int, 1, 2**16), targets=tuple(targets),
                   rank=number("rank", int, 1, 2**16), alpha=number("alpha", float, 1e-12, 1e12),
                   dropout=number("dropout", float, 0.0, 0.999), type=kind)


def _linear_dims(linear):
    """(out, in) of a plain or quantized linear layer."""
    if isinstance(linear, BlockQuantizedLinear):
        return linear.shape
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits  # packed uint32 columns
    return out_dims, in_dims


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * dropout(x) A B, with the base frozen.

    `base` is an nn.Linear, an nn.QuantizedLinear or a BlockQuantizedLinear (QLoRA). B starts at zero, so
    the adapted model equals the base model until training moves it.
    """

    def __init__(self, base, rank=8, alpha=16.0, dropout=0.0):
        super().__init__()
        out_dims, in_dims = _linear_dims(base)
        self.linear = base
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(in_dims)
        # Adapter weights stay float32 whatever the base's dtype: they are what trains.
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def fold(self, w_OI):
        """The base weight `w_OI` (float32) with the adapters folded in."""
        return folded(w_OI, self.lora_a, self.lora_b, self.scale)


class DoRALinear(LoRALinear):
    """DoRA (Liu et al., 2024), as PEFT computes it: the LoRA-updated weight's rows rescaled to a
    trained magnitude, y = m / ||W + s (A B)^T||_row * (x W^T + s x A B). The row norms are a
    constant in backward (the paper's section 4.3); m starts at ||W||_row, so the adapted model
    equals the base model until training moves it. With dropout, as PEFT: the base product of
    the dropped input carries the rescaling, the undropped one stays."""

    def __init__(self, base, rank=8, alpha=16.0, dropout=0.0):
        super().__init__(base, rank, alpha, dropout)
        self.magnitude = row_norms(dense_weight(base))
        self._fixed_rescale_O = None  # private: not a parameter

    def rescale(self):
        """m / ||W + s (A B)^T||_row, the norms a constant in backward: a dense weight a call."""
        norm_O = row_norms(folded(dense_weight(self.linear), self.lora_a, self.lora_b, self.scale))
        return self.magnitude / mx.stop_gradient(norm_O)

    def fix_rescale(self):
        """For generation alone, over a base that cannot be folded (quantized): the rescaling
        computed once, instead of a dense weight for every decoded token."""
        self._fixed_rescale_O = self.rescale()
        mx.eval(self._fixed_rescale_O)

    def __call__(self, x):
        rescale_O = self._fixed_rescale_O if self._fixed_rescale_O is not None else self.rescale()
        rescale_O = rescale_O.astype(x.dtype)
        y = self.linear(x)
        dropped = self.dropout(x)  # x itself when not training
        base = y if dropped is x else self.linear(dropped)
        if "bias" in self.linear:  # as PEFT: the product is rescaled, the bias is not (what the fold keeps)
            base = base - self.linear.bias
        z = (dropped @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + ((rescale_O - 1) * base + rescale_O * (self.scale * z)).astype(y.dtype)

    def fold(self, w_OI):
        return folded(w_OI, self.lora_a, self.lora_b, self.scale, self.magnitude)


def folded(w_OI, a_IR, b_RO, scale, magnitude_O=None):
    """W + scale (A B)^T in float32; with DoRA's magnitude, its rows rescaled to it."""
    w_OI = w_OI.astype(mx.float32) + scale * (a_IR @ b_RO).T
    return w_OI if magnitude_O is None else w_OI * (magnitude_O / row_norms(w_OI))[:, None]


def row_norms(w_OI):
    return mx.sqrt((w_OI.astype(mx.float32) ** 2).sum(axis=1))


def dense_weight(linear):
    """A plain or quantized linear layer's weight [out, in], float32."""
    if isinstance(linear, BlockQuantizedLinear):
        return linear.dense_weight()
    if isinstance(linear, nn.QuantizedLinear):
        return ops.dequantize(linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits)
    return linear.weight.astype(mx.float32)


WRAPPERS = {"lora": LoRALinear, "dora": DoRALinear}


def wrapped(linear, config):
    """`linear` inside the adapter layer `config` asks for, initialized so nothing changes yet."""
    return WRAPPERS[config.type](linear, config.rank, config.alpha, config.dropout)


def parse_targets(targets):
    """'wq,wv', 'q_proj,v_proj' or 'all' -> tuple of names, which apply_lora resolves against the
    model's family; a UserError for an empty or repeated name."""
    names = tuple(t.strip() for t in targets.split(","))
    if not all(names):
        raise UserError(f"--lora-targets: {targets!r} has an empty name")
    if (twice := utils.repeated(names)) is not None:
        raise UserError(f"--lora-targets: {twice} is given twice")
    return names


def apply_lora(model, config: AdapterConfig):
    """Freeze `model` and wrap the targets of its last `config.layers` blocks in LoRALinear (or
    DoRALinear); for type "full", unfreeze those blocks whole instead (every weight of theirs
    trains: they must be float, not quantized).

    Returns the configuration as applied (its layers at most the model's), to save beside the adapters.
    """
    model.freeze()
    n = len(model.layers)
    first = config.first_layer(n)
    targets = model.names.resolve_targets(config.targets) if config.type != "full" else config.targets
    config = applied = dataclasses.replace(config, layers=n - first, targets=targets)
    if config.type == "full":
        for i, layer in enumerate(model.layers[first:], start=first):
            if any(isinstance(m, (nn.QuantizedLinear, BlockQuantizedLinear)) for _, m in layer.named_modules()):
                raise UserError(f"full fine-tuning trains every weight of layer {i}, which is quantized: use a "
                                "float model (convert.py without -q, or fuse.py --de-quantize)")
            layer.unfreeze()
        return applied
    smallest = min(min(_linear_dims(_part(model.layers[0], name)[1])) for name in config.targets)
    if config.rank > smallest:
        raise UserError(f"--lora-rank {config.rank} is more than {smallest}, the smallest dimension of the layers "
                        "to adapt: a larger rank adds nothing")
    for layer in model.layers[first:]:
        for name in config.targets:
            wrap_linear(layer, name, config)
    return applied


def wrap_linear(block, name, config):
    """Replace linear `name` of `block` by its adapter layer; returns that layer."""
    part, linear = _part(block, name)
    layer = wrapped(linear, config)
    setattr(part, name, layer)
    return layer


def _part(block, name):
    """(the part of `block` linear `name` belongs to, the linear): its attention or feed-forward."""
    part = next(child for child in block.children().values() if isinstance(child, nn.Module) and name in child)
    return part, part[name]
