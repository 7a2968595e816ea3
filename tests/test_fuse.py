"""fuse.py: adapters folded into their base and exported, each export loaded by the ecosystem's
own reader (transformers, peft) and compared with the adapted model here; the check that
refuses an export that does not behave as the adapted model; bad input."""

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import chat  # noqa: E402
import convert  # noqa: E402
import fuse  # noqa: E402
import lora  # noqa: E402
import models  # noqa: E402
import loading  # noqa: E402
from formats import hf  # noqa: E402
from formats import mlx as mlx_folder  # noqa: E402
from hf_checkpoints import make_hf_model  # noqa: E402
from utils import UserError, read_jsonl  # noqa: E402
from helpers import (SAMPLES, adapted_logits, byte_level_tokenizer, gguf_model, logits,  # noqa: E402
                     run_fuse, torch_logits, trained)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM = loading.DEFAULT_MODEL


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("fuse"), "llama")


@pytest.fixture(scope="module")
def tuned_dora(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("fuse-dora"), "llama", False, "--fine-tune-type", "dora")


@pytest.fixture(scope="module")
def tuned_q4(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("fuse-q4"), "llama", quantize=True)


def precision_cost(stderr):
    """The largest logit difference fuse.py's check says the export's precision costs."""
    return float(stderr.split("its precision alone costs ")[1].split(" ")[0])


def assert_same_tokenizer_and_template(tokenizer, model_dir):
    """A transformers tokenizer encodes as the model folder's own does, and renders its chat
    template the same."""
    ours = loading.load_model(model_dir)[1]
    for text in SAMPLES:
        assert tokenizer.encode(text, add_special_tokens=False) == ours.encode(text, bos=False), text
    messages = [{"role": "user", "content": "What is MLX?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        chat.render(chat.load_template(model_dir), messages, ours)


def test_fused_model_folder_is_the_adapted_model(tuned, tmp_path):
    model_dir, adapter_file = tuned
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "fused")
    assert run.returncode == 0, run.stderr
    assert "check: largest logit difference" in run.stderr
    expected = adapted_logits(model_dir, adapter_file)
    assert np.abs(logits(loading.load_model(str(tmp_path / "fused"))[0]) - expected).max() <= 1e-4
    # The adapters did move the model: a fuse that wrote the base would fail this test.
    assert np.abs(logits(loading.load_model(model_dir)[0]) - expected).max() > 1e-2


@pytest.mark.parametrize("flavour", ["llama", "llama3"])
def test_hugging_face_export_loads_in_transformers(tmp_path, flavour):
    model_dir, adapter_file = trained(tmp_path, flavour)
    out = tmp_path / "export"
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", out, "--format", "hf",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    expected = adapted_logits(model_dir, adapter_file)
    got = torch_logits(reference)
    assert np.abs(got - expected).max() <= 1e-4 and (got.argmax(-1) == expected.argmax(-1)).all()
    # The tokenizer and the chat template survive.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert_same_tokenizer_and_template(tokenizer, model_dir)


def test_peft_export_loads_in_peft_and_back_in_lora_py(tuned, tmp_path):
    peft = pytest.importorskip("peft")
    model_dir, adapter_file = tuned
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--peft-path", tmp_path / "peft")
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (4, 16.0, [0, 1])
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    adapted = peft.PeftModel.from_pretrained(hf_base(model_dir, tmp_path / "base"), tmp_path / "peft").eval()
    expected = adapted_logits(model_dir, adapter_file)
    assert np.abs(torch_logits(adapted) - expected).max() <= 1e-4
    # lora.py takes the PEFT folder wherever it takes an adapter file.
    model, _, _ = loading.load_model(model_dir, adapter_file=str(tmp_path / "peft"))
    assert np.abs(logits(model) - expected).max() <= 1e-5


def hf_base(model_dir, folder):
    """The base model as transformers has it (written by this toolkit's hf writer), float32."""
    os.makedirs(folder)
    hf.write(mlx_folder.Checkpoint(model_dir), str(folder), "float32")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float()


def test_dora_adapters_load_in_peft_over_the_hugging_face_base(tuned_dora, tmp_path):
    """DoRA exported to PEFT (use_dora, the magnitudes in Hugging Face's row order): peft over the
    base gives our logits; read back by lora.py, the same; fused, the same."""
    peft = pytest.importorskip("peft")
    model_dir, adapter_file = tuned_dora
    trained_magnitude = mx.load(adapter_file)["layers.1.attention.wq.magnitude"]
    base_rows = models.row_norms(loading.load_model(model_dir)[0].layers[1].attention.wq.weight)
    assert mx.abs(trained_magnitude - base_rows).max().item() > 1e-3  # training moved the magnitudes
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--peft-path", tmp_path / "peft")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    adapted = peft.PeftModel.from_pretrained(hf_base(model_dir, tmp_path / "base"), tmp_path / "peft").eval()
    expected = adapted_logits(model_dir, adapter_file)
    got = torch_logits(adapted)
    assert np.abs(got - expected).max() <= 1e-4 and (got.argmax(-1) == expected.argmax(-1)).all()
    model, _, _ = loading.load_model(model_dir, adapter_file=str(tmp_path / "peft"))
    assert np.abs(logits(model) - expected).max() <= 1e-5
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "fused")
    assert run.returncode == 0, run.stderr
    assert np.abs(logits(loading.load_model(str(tmp_path / "fused"))[0]) - expected).max() <= 1e-4


def test_dora_over_a_quantized_base_trains_and_folds(tmp_path):
    model_dir, adapter_file = trained(tmp_path, "llama", True, "--fine-tune-type", "dora")
    log = [r for _, r in read_jsonl(os.path.splitext(adapter_file)[0] + ".metrics.jsonl") if "val_loss" in r]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "dense",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    expected = adapted_logits(model_dir, adapter_file)
    tolerance = 1e-4 * max(1.0, np.abs(expected).max())
    assert np.abs(logits(loading.load_model(str(tmp_path / "dense"))[0]) - expected).max() <= tolerance
    # For generation alone the rescaling is computed once (the base cannot be folded): the same logits.
    generating = loading.load_model(model_dir, adapter_file=adapter_file, generation_only=True)[0]
    assert generating.layers[1].attention.wq._fixed_rescale_O is not None
    assert np.abs(logits(generating) - expected).max() <= tolerance


def test_fused_over_a_quantized_base_is_requantized_and_checked(tuned_q4, tmp_path):
    model_dir, adapter_file = tuned_q4
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "q")
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert precision_cost(run.stderr) > 0  # re-quantizing the changed layers is not free, and it is said
    dense = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "dense",
                     "--de-quantize", "--dtype", "float32")
    assert dense.returncode == 0, dense.stderr
    assert "quantization" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    expected = adapted_logits(model_dir, adapter_file)
    # The quantized matmul against the dense one: float32 rounding of the logits' scale
    tolerance = 1e-4 * max(1.0, np.abs(expected).max())
    assert np.abs(logits(loading.load_model(str(tmp_path / "dense"))[0]) - expected).max() <= tolerance


def float32_gguf(model_dir, adapter_file, tmp_path):
    """The adapters fused into a float32 GGUF file; its path."""
    path = tmp_path / "model.gguf"
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", path, "--format", "gguf",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    return path


def test_gguf_export_loads_in_transformers(tuned, tmp_path):
    model_dir, adapter_file = tuned
    reference, tokenizer = gguf_model(float32_gguf(model_dir, adapter_file, tmp_path))
    expected, got = adapted_logits(model_dir, adapter_file), torch_logits(reference)
    assert np.abs(got - expected).max() <= 1e-4 and (got.argmax(-1) == expected.argmax(-1)).all()
    assert_same_tokenizer_and_template(tokenizer, model_dir)


def test_a_float_gguf_over_a_quantized_base_holds_the_fused_weights_unrounded(tuned_q4, tmp_path):
    """--dtype asks for floats: the changed layers are not re-quantized on the way."""
    model_dir, adapter_file = tuned_q4
    expected = adapted_logits(model_dir, adapter_file)
    got = torch_logits(gguf_model(float32_gguf(model_dir, adapter_file, tmp_path))[0])
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_a_gguf_over_a_quantized_base_is_requantized_as_the_mlx_folder_is(tuned_q4, tmp_path):
    """Default types over a 4-bit base in groups of 32: Q4_1 blocks of the re-quantized MLX
    folder's very codes, its float32 scales and biases rounded to float16 (Q4_1's d and m), as
    convert.py reads them back; transformers' reader computes the same logits."""
    gguf = pytest.importorskip("gguf")
    model_dir, adapter_file = tuned_q4
    path = tmp_path / "model.gguf"
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", path, "--format", "gguf")
    assert run.returncode == 0, run.stderr
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.1.attn_q.weight"] == "Q4_1" and types["blk.1.attn_norm.weight"] == "F32"
    assert run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "q").returncode == 0
    convert.convert(str(path), str(tmp_path / "back"))
    back, folder = (dict(tree_flatten(loading.load_model(str(tmp_path / name))[0].parameters()))
                    for name in ("back", "q"))
    assert back.keys() == folder.keys()
    for key, value in folder.items():
        expected = value.astype(mx.float16) if key.endswith((".scales", ".biases")) else value
        assert mx.array_equal(back[key].astype(expected.dtype), expected), key
    got = torch_logits(gguf_model(path)[0])
    assert np.abs(got - logits(loading.load_model(str(tmp_path / "back"))[0])).max() <= 1e-4 * max(1.0, np.abs(got).max())


@pytest.mark.skipif(not os.path.isdir(SMOLLM), reason="checkpoints/SmolLM2-135M-Instruct is not there (setup.sh)")
def test_smollm2_qlora_fused_to_gguf_round_trip(tmp_path):
    """The real Q4_1 model: QLoRA on the shipped data, fused to GGUF (re-quantized, the original's
    size), read back by transformers and by convert.py: the same logits."""
    adapter_file = str(tmp_path / "ad" / "a.npz")
    lora.main(["--model", SMOLLM, "--train", "--data", os.path.join(ROOT, "data"), "--adapter-file", adapter_file,
               "--iters", "3", "--batch-size", "2", "--max-seq-length", "64", "--learning-rate", "1e-3",
               "--lora-layers", "4", "--lora-targets", "all", "--steps-per-eval", "3", "--val-batches", "1"])
    path = tmp_path / "smollm2.gguf"
    run = run_fuse("--model", SMOLLM, "--adapter-file", adapter_file, "--save-path", path, "--format", "gguf")
    assert run.returncode == 0, run.stderr
    original = os.path.getsize(loading.DEFAULT_GGUF) if os.path.exists(loading.DEFAULT_GGUF) else 98_362_432
    assert abs(os.path.getsize(path) - original) <= 0.001 * original
    tokenizer = loading.load_model(SMOLLM)[1]
    prompt = chat.render(chat.load_template(SMOLLM), [{"role": "user", "content": "What is ReLU in mlx?"}], tokenizer)
    tokens = np.array([tokenizer.encode(prompt, bos=False)])
    convert.convert(str(path), str(tmp_path / "back"))
    back = loading.load_model(str(tmp_path / "back"), compute_dtype="float32")[0]
    theirs = torch_logits(gguf_model(path)[0], tokens)
    ours = logits(back, tokens)
    assert np.abs(ours - theirs).max() <= 2e-3 and (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_an_export_that_is_not_the_adapted_model_is_refused(tuned, tmp_path, monkeypatch):
    """A fold that forgets the adapters' scale, as fused models that silently drift do."""
    model_dir, adapter_file = tuned
    real = fuse.Fused.__init__

    def unscaled(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.scale = 1.0

    monkeypatch.setattr(fuse.Fused, "__init__", unscaled)
    with pytest.raises(UserError, match="do not give the adapted model's logits"):
        fuse.main(["--model", model_dir, "--adapter-file", adapter_file, "--save-path", str(tmp_path / "bad")])
    assert os.listdir(tmp_path) == []


def test_an_export_that_lost_the_adapters_is_refused(tuned, tmp_path, monkeypatch):
    """The fold is right but the file written holds the base model: beyond what its precision
    costs, it is refused."""
    model_dir, adapter_file = tuned
    real = fuse.EXPORTS["mlx"]

    def base_written(fused, args, out):
        _, precision = real(fused, args, out)
        return mlx_folder.Checkpoint(model_dir), precision  # what a writer that dropped the adapters reads back

    monkeypatch.setitem(fuse.EXPORTS, "mlx", base_written)
    with pytest.raises(UserError, match="beyond what its precision costs"):
        fuse.main(["--model", model_dir, "--adapter-file", adapter_file, "--save-path", str(tmp_path / "bad")])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- bad input

def test_adapters_of_another_model_are_a_one_line_error(tuned, tmp_path):
    model_dir, adapter_file = tuned
    other = byte_level_tokenizer(tmp_path / "hf")
    make_hf_model(tmp_path / "hf", "llama", vocab_size=len(other), hidden_size=96)
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "other"), dtype="float32")
    run = run_fuse("--model", tmp_path / "other", "--adapter-file", adapter_file, "--save-path", tmp_path / "x")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "adapters do not fit this model" in run.stderr
    assert not os.path.exists(tmp_path / "x")


def test_a_rank_that_does_not_match_is_a_one_line_error(tuned, tmp_path):
    import shutil

    model_dir, adapter_file = tuned
    shutil.copy(adapter_file, tmp_path / "a.npz")
    config = json.loads(open(adapter_file.replace(".npz", ".json")).read())
    (tmp_path / "a.json").write_text(json.dumps(dict(config, rank=8)))
    run = run_fuse("--model", model_dir, "--adapter-file", tmp_path / "a.npz", "--save-path", tmp_path / "x")
    assert run.returncode == 2 and "adapters do not fit this model" in run.stderr and "the model expects" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx"], "invalid choice: 'onnx'"),
    (["--format", "gguf"], "a GGUF file's name ends in .gguf"),
    (["--format", "hf", "-q"], "--format hf holds floats"),
    ([], "give --save-path (a fused model) or --peft-path"),
    (["-q", "--de-quantize"], "-q quantizes the fused weights and --de-quantize writes them as floats"),
    (["--de-quantize", "-q", "--q-bits", "8"], "give one"),
])
def test_unknown_formats_and_flag_mistakes_are_one_line_errors(tuned, tmp_path, args, message):
    model_dir, adapter_file = tuned
    save = [] if not args else ["--save-path", tmp_path / "x"]
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, *save, *args)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("flag", [["-q"], ["--de-quantize"], ["--dtype", "float16"]])
def test_flags_of_a_fused_model_are_refused_with_peft_path(tuned, tmp_path, flag):
    model_dir, adapter_file = tuned
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--peft-path", tmp_path / "p", *flag)
    assert run.returncode == 2 and "--peft-path writes the adapters alone" in run.stderr
    assert not os.path.exists(tmp_path / "p")


def test_an_existing_save_path_needs_force(tuned, tmp_path):
    model_dir, adapter_file = tuned
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", tmp_path / "x")
    assert run.returncode == 2 and "exists (use --force to replace it)" in run.stderr
    assert os.listdir(tmp_path / "x") == ["keep.txt"]


def test_a_peft_folder_with_modules_this_toolkit_cannot_map_is_refused(tuned, tmp_path):
    model_dir, adapter_file = tuned
    assert run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--peft-path", tmp_path / "p").returncode == 0
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["embed_tokens"])))
    with pytest.raises(UserError, match="cannot map the modules 'embed_tokens'"):
        loading.load_model(model_dir, adapter_file=str(tmp_path / "p"))
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(dict(config, bias="all")))
    with pytest.raises(UserError, match="'bias': 'all' is not supported"):
        loading.load_model(model_dir, adapter_file=str(tmp_path / "p"))
