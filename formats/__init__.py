"""Checkpoint formats convert.py reads, one module each, and the layout they all convert into.

Every format's module offers detect(path) and a Checkpoint(path) class with
`path`, `config` (convert.py's config.json keys), `shapes` ({name: shape} in this
toolkit's names, in writing order), `tensor(name, dtype)` and `tokenizer_files`.
"""

from utils import UserError

FORMATS = ("meta",)  # the modules of this package, tried in order


def expected_shapes(c):
    """Every weight the model needs and its full (merged) shape."""
    D, V, C = c["dim"], c["vocab_size"], c["hidden_dim"]
    Q, KV = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
    for i in range(c["n_layers"]):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (Q, D), p + "attention.wk.weight": (KV, D),
                       p + "attention.wv.weight": (KV, D), p + "attention.wo.weight": (D, Q),
                       p + "feed_forward.w1.weight": (C, D), p + "feed_forward.w2.weight": (D, C),
                       p + "feed_forward.w3.weight": (C, D),
                       p + "attention_norm.weight": (D,), p + "ffn_norm.weight": (D,)})
    return shapes


def module_name(key):
    return key.split(".")[-2]


def open_checkpoint(path):
    """The Checkpoint of whichever format `path` holds."""
    import importlib
    import os

    if not os.path.exists(path):
        raise UserError(f"{path}: checkpoint folder not found")
    for name in FORMATS:
        module = importlib.import_module(f"formats.{name}")
        if module.detect(path):
            return module.Checkpoint(path)
    raise UserError(f"{path}: no checkpoint here (no consolidated.NN.pth shards with params.json)")
