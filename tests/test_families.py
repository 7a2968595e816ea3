"""The model families beyond LLaMA, each against transformers: tiny checkpoints written by
transformers itself (and GGUF files written with the gguf package), converted, their logits
compared; each family's own feature shown to matter; a LoRA on each, exported to Hugging Face,
PEFT and GGUF, read back by transformers, peft and transformers' GGUF loader."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import convert  # noqa: E402
import loading  # noqa: E402
from checkpoints import make_tokenizer  # noqa: E402
from hf_checkpoints import hf_logits, make_hf_model  # noqa: E402
from helpers import (adapted_logits, assert_hugging_face_export_is_the_adapted_model,  # noqa: E402
                     assert_peft_export_is_the_adapted_model, gguf_model, logits, run_fuse, torch_logits, trained)
from utils import UserError  # noqa: E402

FAMILIES = ["qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
LAYERS = {"gemma3_text": 6, "gemma3_gguf": 6}  # one global block in six
LONG = np.random.default_rng(0).integers(3, 320, size=(2, 40))


def converted(root, flavour):
    reference = make_hf_model(root / "hf", flavour, n_layers=LAYERS.get(flavour, 2))
    make_tokenizer(root / "hf")
    convert.convert(str(root / "hf"), str(root / "mlx"), dtype="float32")
    return reference, loading.load_model(str(root / "mlx"))[0]


@pytest.mark.parametrize("flavour", FAMILIES)
def test_logits_match_transformers(tmp_path, flavour):
    reference, model = converted(tmp_path, flavour)
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["model_type"] == flavour
    assert np.abs(logits(model, LONG) - hf_logits(reference, LONG)).max() <= 1e-4


def drop_qkv_biases(model):
    for layer in model.layers:
        for name in ("wq", "wk", "wv"):
            layer.attention[name].bias = mx.zeros_like(layer.attention[name].bias)


def drop_qk_norms(model):
    for layer in model.layers:
        layer.attention.pop("q_norm")
        layer.attention.pop("k_norm")


def unscaled_embeddings(model):
    object.__setattr__(model, "embed", lambda tokens, offset=0: model.tok_embeddings(tokens))


def norms_as_w(model):
    """RMSNorm times w rather than 1 + w."""
    from mlx.utils import tree_flatten, tree_unflatten

    model.update(tree_unflatten([(k, v - 1) for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]))


def rebuilt(tmp_path, model, **change):
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    (tmp_path / "mlx" / "config.json").write_text(json.dumps(dict(config, **change)))
    return loading.load_model(str(tmp_path / "mlx"))[0]


FEATURES = [("qwen2", drop_qkv_biases), ("qwen3", drop_qk_norms), ("gemma", unscaled_embeddings),
            ("gemma", norms_as_w), ("gemma3_text", drop_qk_norms), ("gemma2", {"attn_logit_softcapping": None}),
            ("gemma2", {"final_logit_softcapping": None}), ("gemma2", {"sliding_window_pattern": None}),
            ("gemma3_text", {"sliding_window_pattern": 1}), ("gemma3_text", {"rope_local_base_freq": 1000000.0}),
            ("gemma3_text", {"rope_scaling": None}), ("gemma2", {"query_pre_attn_scalar": 16})]


@pytest.mark.parametrize("flavour, turn_off", FEATURES)
def test_each_family_feature_matters(tmp_path, flavour, turn_off):
    """Guards the test above: without each of its features the family's logits move."""
    reference, model = converted(tmp_path, flavour)
    if isinstance(turn_off, dict):  # a config key: the model rebuilt from the changed config
        model = rebuilt(tmp_path, model, **turn_off)
    else:
        turn_off(model)
    assert np.abs(logits(model, LONG) - hf_logits(reference, LONG)).max() > 1e-2


@pytest.fixture(scope="module", params=FAMILIES + ["phi3", "gpt2"])  # the fused families' exports too
def tuned(request, tmp_path_factory):
    flavour = request.param
    return flavour, trained(tmp_path_factory.mktemp(flavour), flavour, n_layers=LAYERS.get(flavour, 2))


def test_lora_fused_to_hugging_face_loads_in_transformers(tuned, tmp_path):
    flavour, (model_dir, adapter_file) = tuned
    assert_hugging_face_export_is_the_adapted_model(flavour, model_dir, adapter_file, tmp_path / "hf")


def test_peft_export_loads_in_peft_over_the_transformers_base(tuned, tmp_path):
    pytest.importorskip("peft")
    _, (model_dir, adapter_file) = tuned
    assert_peft_export_is_the_adapted_model(model_dir, adapter_file, tmp_path / "peft")


# transformers' GGUF loader has no Gemma 1, and reads Gemma 2 and 3 with its own defaults: those
# flavours are written as llama.cpp and it both compute them.
GGUF_FLAVOURS = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma2_gguf": "gemma2", "gemma3_gguf": "gemma3_text"}


@pytest.mark.parametrize("flavour", GGUF_FLAVOURS)
def test_gguf_export_loads_in_transformers(flavour, tmp_path):
    model_dir, adapter_file = trained(tmp_path / "tuned", flavour, n_layers=LAYERS.get(flavour, 2))
    path = tmp_path / "model.gguf"
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", path, "--format", "gguf",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    reference, _ = gguf_model(str(path))
    assert reference.config.model_type == GGUF_FLAVOURS[flavour]
    assert np.abs(torch_logits(reference) - adapted_logits(model_dir, adapter_file)).max() <= 1e-4
    # And read back here, as a GGUF from Ollama would be: the same model.
    convert.convert(str(path), str(tmp_path / "back"))
    assert np.abs(logits(loading.load_model(str(tmp_path / "back"))[0]) - torch_logits(reference)).max() <= 1e-4


def test_a_gemma_gguf_export_reads_back_as_the_same_model(tmp_path):
    """Gemma 1, which transformers' GGUF loader lacks: the file read back here (its norms stored as
    1 + w, as llama.cpp's converter writes them) gives the adapted model's logits."""
    model_dir, adapter_file = trained(tmp_path / "tuned", "gemma")
    path = tmp_path / "model.gguf"
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", path, "--format", "gguf",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    from formats import gguf as gguf_format

    stored = gguf_format.Checkpoint(str(path))
    # As llama.cpp's converter writes Gemma's norms: 1 + w of the model folder's w (LoRA leaves norms be)
    w = loading.load_model(model_dir)[0].norm.weight
    assert np.array_equal(np.array(stored._stored("norm.weight")), np.array(1 + w))
    convert.convert(str(path), str(tmp_path / "back"))
    back = logits(loading.load_model(str(tmp_path / "back"))[0])
    assert np.abs(back - adapted_logits(model_dir, adapter_file)).max() <= 1e-4


@pytest.mark.parametrize("flavour", FAMILIES)
def test_a_target_the_family_lacks_is_one_line(tmp_path, flavour):
    converted(tmp_path, flavour)
    model_dir = str(tmp_path / "mlx")
    with pytest.raises(UserError, match="this model has no c_attn; choose from wq, wk, wv, wo, w1, w2, w3 "
                                        r"\(or q_proj, k_proj, v_proj, o_proj, gate_proj, down_proj, up_proj\)"):
        import lora
        lora.main(["--model", model_dir, "--train", "--data", "unused", "--lora-targets", "c_attn",
                   "--adapter-file", str(tmp_path / "a.npz"), "--iters", "1"])


@pytest.mark.parametrize("flavour", FAMILIES)
def test_hugging_face_target_names_adapt_the_same_linears(tmp_path, flavour):
    _, model = converted(tmp_path, flavour)
    import models

    applied = models.apply_lora(model, models.AdapterConfig(layers=1, targets=("q_proj", "down_proj")))
    assert applied.targets == ("wq", "w2")


@pytest.mark.parametrize("flavour", ["qwen3", "gemma3_text"])
@pytest.mark.parametrize("quantize, flags", [(True, ()), (False, ("--fine-tune-type", "dora")),
                                             (True, ("--fine-tune-type", "dora"))])
def test_qlora_and_dora_train_and_fuse(tmp_path, flavour, quantize, flags):
    model_dir, adapter_file = trained(tmp_path, flavour, quantize, *flags, n_layers=LAYERS.get(flavour, 2))
    metrics = [json.loads(line) for line in open(adapter_file.replace(".npz", ".metrics.jsonl"))]
    losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[-1] < losses[0]
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "fused")
    assert run.returncode == 0 and "check: largest logit difference" in run.stderr, run.stderr
    if not quantize:  # re-quantized, the fuse's own check judged it against what its precision costs
        fused = logits(loading.load_model(str(tmp_path / "fused"))[0])
        assert np.abs(fused - adapted_logits(model_dir, adapter_file)).max() <= 1e-4


@pytest.mark.parametrize("flavour", FAMILIES)
def test_decoding_over_the_cache_is_the_full_forward(tmp_path, flavour):
    """Per-layer windows and soft caps hold when decoding one token at a time over the KV cache."""
    _, model = converted(tmp_path, flavour)
    tokens = mx.array(LONG[:1])
    full = np.array(model(tokens))
    cache = model.make_cache()
    steps = [np.array(model(tokens[:, :12], cache))] + [np.array(model(tokens[:, t:t + 1], cache))
                                                        for t in range(12, tokens.shape[1])]
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-4
