"""Each family's GGUF export run by llama.cpp itself (llama-cpp-python, optional: `pip install
llama-cpp-python` compiles it): a tiny transformers checkpoint of the family, LoRA-trained here,
fused to a float32 GGUF; llama.cpp's logits of a text equal the adapted model's here. Skipped
where llama-cpp-python is not installed."""

import numpy as np
import pytest
from helpers import TOKENS, adapted_logits, run_fuse, trained

import ops

llama_cpp = pytest.importorskip("llama_cpp")

# The families by their tests' flavours (tests/hf_checkpoints.py), one for each GGUF architecture:
# Gemma 2 and 3 in the values llama.cpp fixes for them (the query scale, six blocks to a global one).
FLAVOURS = {"llama": 2, "qwen2": 2, "qwen3": 2, "gemma": 2, "gemma2_gguf": 2, "gemma3_gguf": 6, "phi3": 2, "gpt2": 2}
F32 = 0  # ggml's type id: llama.cpp's KV cache holds float16 unless told


def table_gelu(a):
    """llama.cpp's CPU GELU (GGML_GELU_FP16): its input rounded to float16, its value read from a
    float16 table. The families with a GELU (Gemma's GeGLU, GPT-2's MLP) are compared with it."""
    import mlx.core as mx
    import mlx.nn as nn

    return nn.gelu_approx(a.astype(mx.float16).astype(mx.float32)).astype(mx.float16).astype(mx.float32)


def without_repacking():
    """llama.cpp's model parameters without its extra buffer types (the weights repacked for AMX's
    int8 tiles, whose kernels stopped on an illegal instruction on this KVM guest's Xeon)."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    return params


def llama_cpp_logits(path, tokens):
    """llama.cpp's logits of every position of `tokens`, one sequence at a time, float32."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, type_k=F32, type_v=F32,
                          verbose=False)
    out = []
    for row in tokens:
        llm.reset()
        llm.eval(list(map(int, row)))
        out.append(np.array(llm.scores[:len(row)], dtype=np.float32))
    return np.stack(out)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_llama_cpp_reads_each_familys_gguf_export_as_the_adapted_model(flavour, tmp_path, monkeypatch):
    model_dir, adapter_file = trained(tmp_path, flavour, n_layers=FLAVOURS[flavour])
    path = tmp_path / "model.gguf"
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", path, "--format", "gguf",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    got = llama_cpp_logits(path, TOKENS)
    monkeypatch.setattr(ops, "gelu", table_gelu)
    monkeypatch.setattr(ops, "geglu", lambda a, b: table_gelu(a) * b)
    expected = adapted_logits(model_dir, adapter_file)
    assert np.abs(got - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max()), np.abs(got - expected).max()


def test_llama_cpp_reads_our_k_quant_blocks(tmp_path, monkeypatch):
    """A tiny model's matrices written by this toolkit's own K-quant quantizers (Q4_K, Q5_K, Q6_K).
    llama.cpp multiplies quantized weights by 8-bit quantized activations (q8_0, q8_K), so its
    logits are read to that precision: judged against the same model in Q8_0 (a type whose reading
    is exact and known), the K-quants' distance from this toolkit's logits is of that order; a block
    packed wrong would be as far off as the logits are large."""
    import mlx.core as mx
    from gguf_files import write_gguf

    import convert
    import loading
    from formats import gguf as gguf_format

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_repacking())
    floats = gguf_format.Checkpoint(write_gguf(str(tmp_path / "f32.gguf"), "F32", dim=256, hidden_dim=512).path)
    mixed = {"attention.wq": "Q4_K", "attention.wk": "Q4_K", "attention.wv": "Q6_K", "attention.wo": "Q5_K",
             "w1": "Q4_K", "w3": "Q5_K", "w2": "Q6_K"}
    errors = {}
    for name, types in (("q8_0", dict.fromkeys(mixed, "Q8_0")), ("k_quants", mixed)):
        path = str(tmp_path / f"{name}.gguf")
        gguf_format.write(floats, path, {key: next((t for part, t in types.items() if part in key), "F32")
                                         for key in floats.shapes})
        convert.convert(path, str(tmp_path / name))
        model, _, _ = loading.load_model(str(tmp_path / name), compute_dtype="float32")
        expected = np.array(model(mx.array(TOKENS)))
        error = np.abs(llama_cpp_logits(path, TOKENS) - expected)
        errors[name] = error.max(), np.sqrt(np.mean(error ** 2)), np.abs(expected).max()
    (q8_max, q8_rms, _), (k_max, k_rms, scale) = errors["q8_0"], errors["k_quants"]
    assert k_max <= 3 * q8_max and k_rms <= 3 * q8_rms and k_max <= 0.1 * scale, errors
