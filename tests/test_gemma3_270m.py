"""The real Gemma 3 270M Q4_K_M (Google's base model, Gemma terms) end to end, against transformers'
own GGUF loader (which dequantizes every tensor to float32). Skipped without the file: `bash setup.sh
--gemma3` (or `python downloads.py gemma3-270m`) fetches it into checkpoints/."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import FUSE, ROOT, gguf_model, logits, torch_logits, write_split

import downloads

GGUF = os.environ.get("MLX_LORA_GEMMA3_GGUF", downloads.ARTEFACTS["gemma3-270m"].path)
pytestmark = pytest.mark.skipif(not os.path.isfile(GGUF), reason=f"{GGUF} is not there (bash setup.sh --gemma3)")

TEXT = ("The quick brown fox jumps over the lazy dog. In 1869, Dmitri Mendeleev published the periodic table; "
        "水 is water, and\n\tcode like `x = f(3.14)` stays code.")
STRINGS = ["Hello, world!", "  leading spaces and trailing  ", "naïve café déjà vu", "日本語のテキストと中文",
           "emoji 🤖🚀 and symbols ∑∫√", "numbers 1234567890 3.14159 1e-5", "<start_of_turn>user\nhi<end_of_turn>",
           "def f(x):\n    return x ** 2\n", "tabs\tand\r\nnewlines\n\n\n", "ALL CAPS AND MiXeD cAsE", ""]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The file converted (as convert.py keeps it: quantized as the file was) and loaded in float32."""
    import loading

    folder = str(tmp_path_factory.mktemp("gemma3") / "mlx")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "--hf-path", GGUF, "--mlx-path", folder],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    model, tokenizer, _ = loading.load_model(folder, compute_dtype="float32")
    return folder, model, tokenizer, run.stderr


@pytest.fixture(scope="module")
def reference():
    """transformers' model and tokenizer of the same file (about a minute to load)."""
    return gguf_model(GGUF)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def test_the_folder_is_at_most_1_3_times_the_file(converted):
    folder, _, _, said = converted
    assert folder_bytes(folder) <= 1.3 * os.path.getsize(GGUF)
    assert "Q4_K weights: 4-bit groups of 32 (exact)" in said  # every type says what it became


def test_logits_match_transformers_reading_of_the_file(converted, reference):
    _, model, tokenizer, _ = converted
    tokens = [tokenizer.encode(TEXT)]
    ours, theirs = logits(model, tokens), torch_logits(reference[0], tokens)
    assert np.abs(ours - theirs).max() <= 1e-3, np.abs(ours - theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_the_same_greedy_continuation_as_transformers(converted, reference):
    import torch

    import generate

    _, model, tokenizer, _ = converted
    prompt = tokenizer.encode("The capital of France is")
    ours = []
    for token in generate.generate_tokens(model, prompt):  # greedy
        ours.append(token)
        if len(ours) == 24:
            break
    with torch.no_grad():
        theirs = reference[0].generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
    assert ours == theirs.tolist()


@pytest.mark.parametrize("text", STRINGS)
def test_the_tokenizer_encodes_as_transformers_does(converted, reference, text):
    _, _, tokenizer, _ = converted
    assert tokenizer.encode(text) == reference[1](text).input_ids
    if "<start_of_turn>" not in text:  # control tokens decode to nothing, as in SentencePiece itself
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text


def test_qlora_on_it_then_fused_to_gguf_read_back_by_transformers(converted, tmp_path):
    """A few QLoRA steps on completions data (the base model has no chat template); fused to GGUF in
    the file's own types, within 5 % of its size, the automatic check passing; transformers' loader
    reads it as this toolkit does."""
    import loading

    folder = converted[0]
    data = tmp_path / "data"
    lines = [{"prompt": f"Q: What is mlx.core.{name} in mlx?\nA:", "completion": f" mlx.core.{name}(a: array) -> array"}
             for name in ("abs", "exp", "log", "sin", "cos", "tanh", "sqrt", "square")]
    for split in ("train", "valid", "test"):
        write_split(data, split, lines)
    adapters = tmp_path / "adapters.npz"
    train = subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), "--model", folder, "--train", "--data",
                            str(data), "--iters", "6", "--batch-size", "2", "--learning-rate", "1e-3", "--warmup", "0",
                            "--steps-per-eval", "6", "--val-batches", "4", "--adapter-file", str(adapters)],
                           capture_output=True, text=True, check=False)
    assert train.returncode == 0, train.stderr
    losses = [float(line.split("val loss ")[1].split(",")[0].split()[0])
              for line in (train.stdout + train.stderr).splitlines() if "val loss " in line]
    assert losses[-1] < losses[0], losses
    fused = tmp_path / "fused.gguf"
    run = subprocess.run([sys.executable, FUSE, "--model", folder, "--adapter-file", str(adapters), "--save-path",
                          str(fused), "--format", "gguf"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert abs(os.path.getsize(fused) - os.path.getsize(GGUF)) <= 0.05 * os.path.getsize(GGUF)
    back = tmp_path / "back"
    convert = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "--hf-path", str(fused), "--mlx-path",
                              str(back)], capture_output=True, text=True, check=False)
    assert convert.returncode == 0, convert.stderr
    model, tokenizer, _ = loading.load_model(str(back), compute_dtype="float32")
    tokens = [tokenizer.encode(TEXT)]
    theirs = torch_logits(gguf_model(str(fused))[0], tokens)
    assert np.abs(logits(model, tokens) - theirs).max() <= 1e-3
