"""The model families beyond LLaMA, each against transformers: tiny checkpoints written by
transformers itself (and GGUF files written with the gguf package), converted, their logits
compared; each family's own feature shown to matter; a LoRA on each, exported to Hugging Face,
PEFT and GGUF, read back by transformers, peft and transformers' GGUF loader."""

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import convert  # noqa: E402
import loading  # noqa: E402
from checkpoints import make_tokenizer  # noqa: E402
from hf_checkpoints import hf_logits, make_hf_model  # noqa: E402
from helpers import adapted_logits, gguf_model, logits, run_fuse, torch_logits, trained  # noqa: E402
from utils import UserError  # noqa: E402

FAMILIES = ["qwen2", "qwen3"]
LONG = np.random.default_rng(0).integers(3, 320, size=(2, 40))


def converted(root, flavour):
    reference = make_hf_model(root / "hf", flavour)
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


@pytest.mark.parametrize("flavour, turn_off", [("qwen2", drop_qkv_biases), ("qwen3", drop_qk_norms)])
def test_each_family_feature_matters(tmp_path, flavour, turn_off):
    """Guards the test above: without its biases or its q/k norms the family's logits move."""
    reference, model = converted(tmp_path, flavour)
    turn_off(model)
    assert np.abs(logits(model, LONG) - hf_logits(reference, LONG)).max() > 1e-2


@pytest.fixture(scope="module", params=FAMILIES)
def tuned(request, tmp_path_factory):
    return request.param, trained(tmp_path_factory.mktemp(request.param), request.param)


def test_lora_fused_to_hugging_face_loads_in_transformers(tuned, tmp_path):
    flavour, (model_dir, adapter_file) = tuned
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "hf",
                   "--format", "hf", "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert exported.config.model_type == flavour
    expected = adapted_logits(model_dir, adapter_file)
    assert np.abs(torch_logits(exported.float().eval()) - expected).max() <= 1e-4
    assert np.abs(logits(loading.load_model(model_dir)[0]) - expected).max() > 1e-2  # the adapters matter


def test_peft_export_loads_in_peft_over_the_transformers_base(tuned, tmp_path):
    peft = pytest.importorskip("peft")
    flavour, (model_dir, adapter_file) = tuned
    base_dir = os.path.join(os.path.dirname(model_dir), "hf")
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--peft-path", tmp_path / "peft")
    assert run.returncode == 0, run.stderr
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").float()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert np.abs(torch_logits(adapted) - adapted_logits(model_dir, adapter_file)).max() <= 1e-4


def test_gguf_export_loads_in_transformers(tuned, tmp_path):
    flavour, (model_dir, adapter_file) = tuned
    path = tmp_path / "model.gguf"
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", path, "--format", "gguf",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    reference, _ = gguf_model(str(path))
    assert reference.config.model_type == flavour
    assert np.abs(torch_logits(reference) - adapted_logits(model_dir, adapter_file)).max() <= 1e-4
    # And read back here, as a GGUF from Ollama would be: the same model.
    convert.convert(str(path), str(tmp_path / "back"))
    assert np.abs(logits(loading.load_model(str(tmp_path / "back"))[0]) - torch_logits(reference)).max() <= 1e-4


def test_a_target_the_family_lacks_is_one_line(tuned, tmp_path):
    flavour, (model_dir, _) = tuned
    with pytest.raises(UserError, match="this model has no c_attn; choose from wq, wk, wv, wo, w1, w2, w3 "
                                        r"\(or q_proj, k_proj, v_proj, o_proj, gate_proj, down_proj, up_proj\)"):
        import lora
        lora.main(["--model", model_dir, "--train", "--data", "unused", "--lora-targets", "c_attn",
                   "--adapter-file", str(tmp_path / "a.npz"), "--iters", "1"])


def test_hugging_face_target_names_adapt_the_same_linears(tuned):
    flavour, (model_dir, _) = tuned
    model = loading.load_model(model_dir)[0]
    import models

    applied = models.apply_lora(model, models.AdapterConfig(layers=1, targets=("q_proj", "down_proj")))
    assert applied.targets == ("wq", "w2")


@pytest.mark.parametrize("quantize, flags", [(True, ()), (False, ("--fine-tune-type", "dora")),
                                             (True, ("--fine-tune-type", "dora"))])
def test_qlora_and_dora_on_qwen3_train_and_fuse(tmp_path, quantize, flags):
    model_dir, adapter_file = trained(tmp_path, "qwen3", quantize, *flags)
    metrics = [json.loads(line) for line in open(adapter_file.replace(".npz", ".metrics.jsonl"))]
    losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[-1] < losses[0]
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "fused")
    assert run.returncode == 0 and "check: largest logit difference" in run.stderr, run.stderr
    if not quantize:  # re-quantized, the fuse's own check judged it against what its precision costs
        fused = logits(loading.load_model(str(tmp_path / "fused"))[0])
        assert np.abs(fused - adapted_logits(model_dir, adapter_file)).max() <= 1e-4
