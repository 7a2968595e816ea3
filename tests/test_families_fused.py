"""Phi-3 and GPT-2, the families whose projections Hugging Face fuses (qkv_proj and gate_up_proj;
c_attn) and that we keep fused, against transformers as tests/test_families.py does the others:
tiny checkpoints written by transformers, converted, their logits compared; each feature shown
to matter (partial rotary, LongRoPE, the window; position embeddings, biases); a LoRA on each,
exported to GGUF and read back by transformers' GGUF loader (GPT-2, and Phi-3 without the features
that loader cannot read) or back here. Their Hugging Face and PEFT exports are checked with every
family's in tests/test_families.py."""

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import convert  # noqa: E402
import loading  # noqa: E402
import models  # noqa: E402
from checkpoints import make_tokenizer  # noqa: E402
from hf_checkpoints import hf_logits, make_hf_model  # noqa: E402
from helpers import (adapted_logits, gguf_model, logits, run_fuse, torch_logits, trained)
from utils import UserError, read_json  # noqa: E402

FAMILIES = ["phi3", "gpt2"]
LONG = np.random.default_rng(0).integers(3, 320, size=(2, 40))  # past Phi-3's original context of 16


def converted(root, flavour):
    reference = make_hf_model(root / "hf", flavour)
    make_tokenizer(root / "hf")
    convert.convert(str(root / "hf"), str(root / "mlx"), dtype="float32")
    return reference, loading.load_model(str(root / "mlx"))[0]


def rebuilt(tmp_path, **change):
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    (tmp_path / "mlx" / "config.json").write_text(json.dumps(dict(config, **change)))
    return loading.load_model(str(tmp_path / "mlx"))[0]


@pytest.mark.parametrize("flavour", FAMILIES)
def test_logits_match_transformers(tmp_path, flavour):
    """Within and past Phi-3's original context (its short and long LongRoPE factors), and the window."""
    reference, model = converted(tmp_path, flavour)
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["model_type"] == flavour
    for tokens in (LONG[:, :12], LONG):
        assert np.abs(logits(model, tokens) - hf_logits(reference, tokens)).max() <= 1e-4


def whole_heads_turned(tmp_path):
    """partial_rotary_factor 1: twice the turned pairs, LongRoPE's factors repeated to match."""
    scaling = json.loads((tmp_path / "mlx" / "config.json").read_text())["rope_scaling"]
    return rebuilt(tmp_path, partial_rotary_factor=1.0, rope_scaling=dict(
        scaling, short_factor=scaling["short_factor"] * 2, long_factor=scaling["long_factor"] * 2))


def without_longrope(tmp_path):
    return rebuilt(tmp_path, rope_scaling=None)


def without_window(tmp_path):
    return rebuilt(tmp_path, sliding_window=None)


def without_positions(tmp_path):
    model = loading.load_model(str(tmp_path / "mlx"))[0]
    model.pos_embeddings.weight = mx.zeros_like(model.pos_embeddings.weight)
    return model


def without_biases(tmp_path):
    model = loading.load_model(str(tmp_path / "mlx"))[0]
    for layer in model.layers:
        for linear in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w2):
            linear.bias = mx.zeros_like(linear.bias)
    return model


@pytest.mark.parametrize("flavour, turn_off", [("phi3", whole_heads_turned), ("phi3", without_longrope),
                                               ("phi3", without_window), ("gpt2", without_positions),
                                               ("gpt2", without_biases)])
def test_each_family_feature_matters(tmp_path, flavour, turn_off):
    """Guards the test above: without each feature the logits move."""
    reference, _ = converted(tmp_path, flavour)
    assert np.abs(logits(turn_off(tmp_path), LONG) - hf_logits(reference, LONG)).max() > 1e-2


@pytest.mark.parametrize("flavour", FAMILIES)
def test_decoding_over_the_cache_is_transformers_decoding(tmp_path, flavour):
    """A prompt within Phi-3's original context, then one token at a time past it: transformers turns
    the later tokens with the long factors, keeping the keys it cached with the short ones; GPT-2's
    positions go on from the cache's."""
    import torch

    reference, model = converted(tmp_path, flavour)
    tokens = LONG[:1]
    with torch.no_grad():
        out = reference(torch.as_tensor(tokens[:, :12]), use_cache=True)
        expected, past = [out.logits.numpy()], getattr(out, "cache", None) or out.past_key_values
        for t in range(12, tokens.shape[1]):
            out = reference(torch.as_tensor(tokens[:, t:t + 1]), past_key_values=past, use_cache=True)
            expected.append(out.logits.numpy())
    cache = model.make_cache()
    ours = [np.array(model(mx.array(tokens[:, :12]), cache))] + [np.array(model(mx.array(tokens[:, t:t + 1]), cache))
                                                                  for t in range(12, tokens.shape[1])]
    assert np.abs(np.concatenate(ours, axis=1) - np.concatenate(expected, axis=1)).max() <= 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def tuned(request, tmp_path_factory):
    return request.param, trained(tmp_path_factory.mktemp(request.param), request.param)


def test_lora_on_the_fused_linears_trains(tuned):
    flavour, (model_dir, adapter_file) = tuned
    metrics = [json.loads(line) for line in open(adapter_file.replace(".npz", ".metrics.jsonl"))]
    losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[-1] < losses[0]
    adapters = mx.load(adapter_file)
    assert any(".attention.wqkv.lora_a" in name for name in adapters)  # one LoRA on the fused projection


def fused_to_gguf(model_dir, adapter_file, path):
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", path, "--format", "gguf",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr


def test_gguf_export_reads_back_as_the_same_model(tuned, tmp_path):
    """Phi-3's partial rotary, LongRoPE (factor tensors and keys, as llama.cpp's converter writes them)
    and window, which transformers' GGUF loader does not read: the file read back here; GPT-2 also
    by transformers' loader, which undoes llama.cpp's transposition of its Conv1D weights."""
    flavour, (model_dir, adapter_file) = tuned
    path = tmp_path / "model.gguf"
    fused_to_gguf(model_dir, adapter_file, path)
    expected = adapted_logits(model_dir, adapter_file)
    convert.convert(str(path), str(tmp_path / "back"))
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    original = read_json(os.path.join(model_dir, "config.json"), "config.json")
    for key in ("partial_rotary_factor", "sliding_window", "context_length"):
        assert back.get(key) == original.get(key), key
    if flavour == "phi3":  # LongRoPE's factors as float32 tensors, its other numbers as keys
        ours, theirs = back["rope_scaling"], original["rope_scaling"]
        assert ours.keys() == theirs.keys() and all(np.allclose(ours[k], theirs[k]) for k in ours if k != "rope_type")
    assert np.abs(logits(loading.load_model(str(tmp_path / "back"))[0]) - expected).max() <= 1e-4
    if flavour == "gpt2":
        reference, _ = gguf_model(str(path))
        assert reference.config.model_type == "gpt2"
        assert np.abs(torch_logits(reference) - expected).max() <= 1e-4


def test_a_plain_phi3_gguf_export_loads_in_transformers(tmp_path):
    """Whole heads turned, no LongRoPE, no window: what transformers' GGUF loader reads of Phi-3. The
    fused attn_qkv and ffn_up (gate then up) are laid out as llama.cpp's converter lays them."""
    model_dir, adapter_file = trained(tmp_path / "tuned", "phi3_gguf")
    path = tmp_path / "model.gguf"
    fused_to_gguf(model_dir, adapter_file, path)
    import torch

    # pad_token_id: Phi3Config's default 32000 lies past the tiny vocabulary
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, pad_token_id=None,
                                                                  dtype=torch.float32).eval()
    assert reference.config.model_type == "phi3"
    assert np.abs(torch_logits(reference) - adapted_logits(model_dir, adapter_file)).max() <= 1e-4


@pytest.mark.parametrize("flavour, targets, ours", [("phi3", ("qkv_proj", "down_proj"), ("wqkv", "w2")),
                                                    ("phi3", ("gate_up_proj",), ("w13",)),
                                                    ("gpt2", ("c_proj",), ("wo", "w2")),  # as PEFT: both
                                                    ("gpt2", ("attn.c_proj", "c_fc"), ("wo", "w1"))])
def test_hugging_face_target_names_adapt_the_same_linears(tmp_path, flavour, targets, ours):
    _, model = converted(tmp_path, flavour)
    assert models.apply_lora(model, models.AdapterConfig(layers=1, targets=targets)).targets == ours


@pytest.mark.parametrize("flavour, listed", [
    ("phi3", r"wqkv, wo, w13, w2 \(or qkv_proj, o_proj, gate_up_proj, down_proj\)"),
    ("gpt2", r"wqkv, wo, w1, w2 \(or c_attn, attn.c_proj, c_fc, mlp.c_proj\)")])
def test_a_target_the_family_lacks_is_one_line(tmp_path, flavour, listed):
    converted(tmp_path, flavour)
    import lora

    with pytest.raises(UserError, match=f"this model has no q_proj; choose from {listed}, or 'all'"):
        lora.main(["--model", str(tmp_path / "mlx"), "--train", "--data", "unused", "--lora-targets", "q_proj",
                   "--adapter-file", str(tmp_path / "a.npz"), "--iters", "1"])


def written_config(tmp_path, flavour, **change):
    make_hf_model(tmp_path / "hf", flavour)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config, **change)))
    make_tokenizer(tmp_path / "hf")


@pytest.mark.parametrize("flavour, change, message", [
    # the fused projections' rows must split into the heads (and halves) the config says
    ("phi3", {"num_key_value_heads": 4}, r"self_attn.qkv_proj.weight has shape \(128, 64\), expected \(192, 64\)"),
    ("phi3", {"intermediate_size": 100}, r"mlp.gate_up_proj.weight has shape \(256, 64\), expected \(200, 64\)"),
    ("gpt2", {"n_inner": 200}, r"mlp.c_fc.weight has shape \(64, 256\), expected \(64, 200\)"),  # Conv1D: [in, out]
    ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}},
     r"'rope_scaling.short_factor' must be a list of 4 numbers \(one a turned pair of a head\), got \[1.0"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.2}},
     "partial_rotary_factor 0.2 turns 3 of each head's 16 dims: RoPE turns pairs"),
    ("gpt2", {"activation_function": "relu"}, "'activation_function' is 'relu': a gpt2 model here has 'gelu_new'"),
])
def test_bad_checkpoints_are_one_line(tmp_path, flavour, change, message):
    written_config(tmp_path, flavour, **change)
    with pytest.raises(UserError, match=message) as error:
        convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"))
    assert "\n" not in str(error.value)


def test_gpt2_refuses_a_text_past_its_positions(tmp_path):
    _, model = converted(tmp_path, "gpt2")
    with pytest.raises(UserError, match="a text of 1025 tokens: this GPT-2 model has positions for 1024"):
        model(mx.zeros((1, 1025), dtype=mx.int32))


def test_gpt2_as_openai_saved_it(tmp_path):
    """OpenAI's checkpoint (GPT2Model's names, no transformer. prefix) with the causal-mask buffers
    older transformers saved: the same model."""
    from safetensors.numpy import load_file, save_file

    reference = make_hf_model(tmp_path / "hf", "gpt2", max_shard_size="1GB")
    make_tokenizer(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    bare = {name.removeprefix("transformer."): value for name, value in weights.items()}
    bare.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 1024, 1024), np.float32)) for i in range(2)})
    save_file(bare, tmp_path / "hf" / "model.safetensors")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    model = loading.load_model(str(tmp_path / "mlx"))[0]
    assert np.abs(logits(model, LONG) - hf_logits(reference, LONG)).max() <= 1e-4


@pytest.mark.parametrize("flavour", FAMILIES)
@pytest.mark.parametrize("quantize, flags", [(True, ()), (False, ("--fine-tune-type", "dora"))])
def test_qlora_and_dora_train_and_fuse(tmp_path, flavour, quantize, flags):
    """QLoRA over quantized fused linears (GPT-2's with their biases, its position embeddings quantized
    too); DoRA on them, folded as it computes."""
    model_dir, adapter_file = trained(tmp_path, flavour, quantize, *flags)
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "fused")
    assert run.returncode == 0 and "check: largest logit difference" in run.stderr, run.stderr
    if not quantize:  # re-quantized, the fuse's own check judged it against what its precision costs
        fused = logits(loading.load_model(str(tmp_path / "fused"))[0])
        assert np.abs(fused - adapted_logits(model_dir, adapter_file)).max() <= 1e-4


def test_dora_rescales_a_biased_linears_product_not_its_bias():
    """As PEFT, and as the fold: DoRA on GPT-2's (or Qwen2's) biased linears."""
    linear = models.Linear(8, 6, bias=True)
    dora = models.DoRALinear(linear, rank=2)
    dora.lora_b = mx.random.normal((2, 6))
    x = mx.random.normal((3, 8))
    assert np.abs(np.array(dora(x)) - np.array(x @ dora.fold(linear.weight).T + linear.bias)).max() <= 1e-5
