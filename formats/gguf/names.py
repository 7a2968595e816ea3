"""GGUF's tensor names, through the model family's one table (its NAMES), and the check that a
file holds exactly the weights its metadata implies.
"""

from utils import UserError

ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency RoPE divisors: read into the config


def our_name(table, gguf_name):
    """This toolkit's name for a GGUF tensor of a family of NameTable `table`, or None."""
    return table.rename(gguf_name, "gguf", "ours")


def gguf_name(table, name):
    """The GGUF name of one of our weights."""
    return table.rename(name, "ours", "gguf")


def check_tensors(entries, shapes, path, table):
    """The file holds exactly the weights the config needs, each of its shape."""
    for name, shape in shapes.items():
        if name not in entries:
            raise UserError(f"{path}: tensor {gguf_name(table, name)} ({name}) is missing")
        if entries[name].shape != shape:
            raise UserError(f"{path}: {entries[name].gguf_name} ({name}) has shape {entries[name].shape}, "
                            f"expected {shape}")
    for name in sorted(entries.keys() - shapes.keys()):
        raise UserError(f"{path}: unexpected tensor {entries[name].gguf_name} for a model of "
                        f"{len(shapes)} weights (block_count, tied output?)")
