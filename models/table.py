"""One family's weights under every name they go by: this toolkit's module tree (which is Meta's
checkpoint layout), Hugging Face's and GGUF's, with the shape each has.

A family file declares one NameTable; every reader, writer and adapter mapping goes
through it, so a checkpoint's names are spelled in one place.
"""

import functools
import re
from dataclasses import dataclass
from typing import Callable, Optional

from utils import UserError

# Where the blocks' weights sit, in each naming: N is the block's index.
BLOCK_PREFIXES = {"ours": "layers.{}.", "hf": "model.layers.{}.", "gguf": "blk.{}."}
SUFFIXES = (".weight", ".bias")
LAYER_INDEX = r"(0|[1-9][0-9]{0,5})"  # bounded: a name from a file cannot make a huge index


@dataclass(frozen=True)
class Weight:
    """One module holding a weight, named in each naming, without the block prefix or `.weight`."""
    ours: str                          # "attention.wq" in a block, "norm" at the top
    hf: str                            # "self_attn.q_proj", "model.norm"
    gguf: str                          # "attn_q", "output_norm"
    shape: Callable[[dict], tuple]     # its `.weight`'s shape, of the model config
    meta_split: Optional[int] = None   # the axis Meta's model-parallel shards split it along
    rope_heads: Optional[str] = None   # config key of its head count: RoPE query or key rows, which
                                       # Hugging Face stores each head's pair halves apart
    absent_if: Optional[str] = None    # config key that, when true, means no such weight (a tied output)
    bias: bool = False                 # a `.bias` of shape[0] beside the `.weight`
    norm: bool = False                 # a norm inside a part (attention.q_norm): not a linear
    gguf_plus: float = 0.0             # GGUF holds it plus this (Gemma's norms: llama.cpp stores 1 + w)
    hf_transposed: bool = False        # Hugging Face holds the `.weight` [in, out] (GPT-2's Conv1D)

    @property
    def linear(self):
        """An adaptable linear of a block: a module of a part (attention.wq, feed_forward.w1)."""
        return "." in self.ours and not self.norm


class NameTable:
    def __init__(self, top, block, hf_blocks=BLOCK_PREFIXES["hf"]):
        """`hf_blocks`: where Hugging Face's checkpoints of the family keep block N (GPT-2: transformer.h.N.)."""
        self.top, self.block = tuple(top), tuple(block)
        self.prefixes = dict(BLOCK_PREFIXES, hf=hf_blocks)
        self._patterns = {naming: _name_pattern(prefix) for naming, prefix in self.prefixes.items()}
        self._by_name = {naming: ({getattr(w, naming): w for w in self.top},
                                  {getattr(w, naming): w for w in self.block}) for naming in BLOCK_PREFIXES}

    @functools.cached_property  # the table never changes; asked per layer and target
    def parts(self):
        """{linear: the part of a block it belongs to}: wq: attention, w1: feed_forward."""
        return {w.ours.split(".")[1]: w.ours.split(".")[0] for w in self.block if w.linear}

    @functools.cached_property
    def hf_linears(self):
        """{Hugging Face's name of each linear of a block: ours}, each name the shortest end of its
        module path that names it alone (q_proj; GPT-2's attn.c_proj and mlp.c_proj), as PEFT's
        target_modules spell them."""
        names = {}
        for w in self.block:
            if w.linear:
                parts = w.hf.split(".")
                ends = (".".join(parts[-n:]) for n in range(1, len(parts) + 1))
                names[next(end for end in ends if self.matching(end) == [_linear_name(w)])] = _linear_name(w)
        return names

    def matching(self, name):
        """Our names of the linears whose Hugging Face module path in a block is `name` or ends in
        `.name`: the ones PEFT adapts for that target_modules entry (c_proj: both of GPT-2's)."""
        return [_linear_name(w) for w in self.block if w.linear and (w.hf == name or w.hf.endswith("." + name))]

    def target_path(self, layer_index, linear):
        """Where `linear` of block `layer_index` lives in the module tree: layers.N.attention.wq."""
        return f"layers.{layer_index}.{self.parts[linear]}.{linear}"

    def shapes(self, config):
        """{our name: shape} of every weight a model of `config` has."""
        def tensors(prefix, weights):
            for w in weights:
                if w.absent_if is None or not config.get(w.absent_if):
                    shape = tuple(w.shape(config))
                    yield f"{prefix}{w.ours}.weight", shape
                    if w.bias:
                        yield f"{prefix}{w.ours}.bias", shape[:1]
        shapes = dict(tensors("", self.top))
        for i in range(config["n_layers"]):
            shapes.update(tensors(BLOCK_PREFIXES["ours"].format(i), self.block))
        return shapes

    def resolve_targets(self, targets, where="--lora-targets"):
        """Our names of the linears `targets` names: ours (wq), Hugging Face's (q_proj), or 'all';
        a UserError starting with `where` and listing this family's for any other."""
        if tuple(targets) == ("all",):
            return tuple(self.parts)
        resolved = {t: [t] if t in self.parts else self.matching(t) for t in targets}
        unknown = [t for t, ours in resolved.items() if not ours]
        if unknown or not targets:
            raise UserError(f"{where}: this model has no {', '.join(unknown) or 'linears named'}; choose "
                            f"from {', '.join(self.parts)} (or {', '.join(self.hf_linears)}), or 'all'")
        return tuple(dict.fromkeys(name for t in targets for name in resolved[t]))

    def weight(self, name, naming="ours"):
        """The Weight `name` (in `naming`) is a tensor of, or None."""
        found = self._split(name, naming)
        return None if found is None else found[1]

    def rename(self, name, naming, into):
        """`name` of one naming in another ("ours", "hf", "gguf"), or None if no weight has it."""
        found = self._split(name, naming)
        if found is None:
            return None
        index, w, suffix = found
        local = getattr(w, into)
        return local + suffix if index is None else self.prefixes[into].format(index) + local + suffix

    def _split(self, name, naming):
        """(block index or None, Weight, suffix) of a tensor name, or None."""
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            return None
        module = name[:-len(suffix)]
        top, block = self._by_name[naming]
        if module in top:
            return None, top[module], suffix
        match = self._patterns[naming].fullmatch(module)
        if match and match[2] in block:
            return int(match[1]), block[match[2]], suffix
        return None


def _linear_name(weight):
    """A linear's name in its part: wq of attention.wq."""
    return weight.ours.split(".")[1]


def _name_pattern(prefix):
    return re.compile(re.escape(prefix).replace(re.escape("{}"), LAYER_INDEX) + r"(.+)")
