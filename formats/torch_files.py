"""PyTorch checkpoint files (.pth, .bin) read safely: weights only, memory-mapped.

torch serves here alone: it is the only reader of its pickle-based format.
weights_only makes its unpickler accept tensors and plain containers and refuse
anything that would run code.
"""

import pickle
import zipfile

from utils import UserError

import mlx.core as mx


def load_state_dict(path):
    """{name: torch tensor}, memory-mapped; a UserError for anything else."""
    import torch

    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a PyTorch checkpoint: not a zip archive (corrupt or truncated "
                        "file, or torch's legacy pre-1.6 format, which cannot be memory-mapped)")
    try:
        sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refusing to load it: it contains pickled code/objects not allowed "
                        "in a weights-only checkpoint (it could run arbitrary code)")
    except Exception as e:  # torch raises RuntimeError / OSError / EOFError for damaged files
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {detail}")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict)")
    return sd


def dtype_name(tensor):
    """"float32", "float16" or "bfloat16"; None for any other type."""
    name = str(tensor.dtype).removeprefix("torch.")
    return name if name in ("float32", "float16", "bfloat16") else None


def to_mx(tensor):
    """A float torch tensor as an mx.array of the same type (bfloat16 through its bits)."""
    import torch

    t = tensor.contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())
