import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402,F401  (loads the fast BLAS before anything imports mlx.core)

import pytest  # noqa: E402

from checkpoints import ASSETS, make_checkpoint  # noqa: E402

STORIES = os.path.join(ASSETS, "stories260K")


def convert_checkpoint(torch_dir, mlx_dir, **options):
    """Convert with the real converter, float32 unless told otherwise."""
    import convert

    options.setdefault("dtype", "float32")
    convert.convert(str(torch_dir), str(mlx_dir), **options)
    return str(mlx_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random LLaMA-2 checkpoint converted to float32: (mlx folder, Checkpoint)."""
    root = tmp_path_factory.mktemp("tiny_llama")
    ckpt = make_checkpoint(root / "torch", "llama2", n_layers=2, seed=1)
    return convert_checkpoint(root / "torch", root / "mlx"), ckpt


@pytest.fixture(scope="session")
def stories_model(tmp_path_factory):
    """The real stories260K model converted to float32; skipped without ../shared."""
    if not os.path.exists(os.path.join(STORIES, "consolidated.00.pth")):
        pytest.skip("../shared/assets/stories260K is not available")
    return convert_checkpoint(STORIES, tmp_path_factory.mktemp("stories") / "mlx")
