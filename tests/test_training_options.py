"""What users ask of a fine-tuning tool: epochs, early stopping with the best adapters kept."""

import os
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import lora
import trainer
from utils import UserError, read_jsonl
from helpers import LORA, assert_same_bits, read_adapters, run_training, write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("options") / "data", n_train=64, n_valid=4)


def records(adapter_file):
    return [r for _, r in read_jsonl(os.path.splitext(str(adapter_file))[0] + ".metrics.jsonl")]


def test_epochs_run_ceil_examples_over_batch_steps_each(tiny_llama, data, tmp_path, capsys):
    adapter_file = tmp_path / "a.npz"
    lora.main(["--model", tiny_llama[0], "--train", "--data", data, "--adapter-file", str(adapter_file),
               "--epochs", "2", "--batch-size", "4", "--lora-layers", "2", "--steps-per-report", "8",
               "--steps-per-eval", "100", "--learning-rate", "1e-3"])
    assert "2 epoch(s) of 64 examples in batches of 4: 32 steps" in capsys.readouterr().err
    assert [r["step"] for r in records(adapter_file) if "train_loss" in r] == [8, 16, 24, 32]
    assert trainer.Checkpoints(str(tmp_path / "a-checkpoints")).all()[-1].endswith("step-00000032.safetensors")


def test_epochs_and_iters_together_are_refused(tiny_llama, data, tmp_path):
    with pytest.raises(UserError, match="--iters and --epochs"):
        run_training(tiny_llama[0], data, tmp_path / "a.npz", "--epochs", "2")  # run_training gives --iters


# lr 1e-2 on every linear: the validation loss falls to its lowest at step 4, then rises.
RISING = ("--iters", "20", "--steps-per-eval", "2", "--save-every", "2", "--keep-checkpoints", "20",
          "--lora-targets", "all", "--learning-rate", "1e-2")


@pytest.fixture(scope="module")
def stopped_early(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    data = write_dataset(root / "data", n_train=16, n_valid=4)
    adapter_file = root / "adapters.npz"
    run_training(tiny_llama[0], data, adapter_file, *RISING, "--early-stop", "3")
    return tiny_llama[0], data, adapter_file


def test_early_stop_ends_the_run_with_the_best_adapters_in_the_file(stopped_early):
    _, _, adapter_file = stopped_early
    log = records(adapter_file)
    vals = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    best_step, best = min(vals, key=lambda v: v[1])
    assert [r["step"] for r in log if r.get("best")] == [s for s, v in vals if v == min(w for t, w in vals if t <= s)]
    assert vals[-1][0] == best_step + 3 * 2 < 20  # three evaluations without a lower loss, then the end
    assert log[-1] == {"step": best_step + 6, "early_stop": True, "best_step": best_step}
    checkpoints = trainer.Checkpoints(str(adapter_file).replace(".npz", "-checkpoints"))
    arrays, meta = trainer.load_checkpoint(checkpoints.path(best_step))
    saved = read_adapters(adapter_file)
    for name, value in saved.items():
        np.testing.assert_array_equal(value, np.array(arrays[f"model.{name}"]), err_msg=name)
    assert not np.array_equal(saved[next(iter(saved))], read_adapters_at(checkpoints.latest(), next(iter(saved))))


def read_adapters_at(checkpoint, name):
    return np.array(mx.load(checkpoint)[f"model.{name}"])


def test_a_run_that_stopped_early_is_not_resumed(stopped_early, tmp_path):
    model_dir, data, adapter_file = stopped_early
    with pytest.raises(UserError, match="stopped early"):
        run_training(model_dir, data, adapter_file, *RISING, "--early-stop", "3", "--resume", "latest")


def test_a_resumed_run_keeps_the_best_so_far(stopped_early, tmp_path):
    """Interrupted after the best evaluation and resumed: the same end, the same adapters."""
    model_dir, data, reference = stopped_early
    adapter_file = tmp_path / "adapters.npz"
    run_training(model_dir, data, adapter_file, *RISING, "--early-stop", "3", "--iters", "8")
    run_training(model_dir, data, adapter_file, *RISING, "--early-stop", "3", "--resume", "latest")
    assert_same_bits(read_adapters(adapter_file), read_adapters(reference))
    assert records(adapter_file)[-1] == records(reference)[-1]


KILL_IN_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_in_checkpoint.py")


def optimizer_run(model_dir, data, adapter_file, optimizer, *extra, killed_at=None):
    """lora.py with `optimizer` in a process of its own (killed while writing the checkpoint of
    step `killed_at`, if given); its exit code."""
    command = [sys.executable, *([KILL_IN_CHECKPOINT, str(killed_at)] if killed_at else [LORA]),
               "--model", model_dir, "--train", "--data", data, "--adapter-file", str(adapter_file),
               "--iters", "12", "--save-every", "4", "--batch-size", "4", "--learning-rate", "1e-2",
               "--lora-layers", "2", "--lora-targets", "all", "--lora-dropout", "0.1", "--steps-per-eval", "6",
               "--optimizer", optimizer, *extra]
    return subprocess.run(command, capture_output=True, text=True).returncode


@pytest.mark.parametrize("optimizer", trainer.OPTIMIZERS)
def test_every_optimizer_resumes_bit_identical_after_sigkill(tiny_llama, data, tmp_path, optimizer):
    decay = () if optimizer == "adam" else ("--weight-decay", "0.01")
    reference, killed = tmp_path / "reference" / "a.npz", tmp_path / "killed" / "a.npz"
    assert optimizer_run(tiny_llama[0], data, reference, optimizer, *decay) == 0
    assert optimizer_run(tiny_llama[0], data, killed, optimizer, *decay, killed_at=8) == -signal.SIGKILL
    assert optimizer_run(tiny_llama[0], data, killed, optimizer, *decay, "--resume", "latest") == 0
    assert_same_bits(read_adapters(killed), read_adapters(reference))
    # Each optimizer's own state went through the checkpoint (Adam's moments, SGD's velocity, ...).
    state = [k for k in mx.load(trainer.Checkpoints(str(killed).replace(".npz", "-checkpoints")).latest())
             if k.startswith("optimizer.") and ".lora_" in k]
    assert state, optimizer


def test_each_optimizer_trains(tiny_llama, data, tmp_path):
    """Every optimizer lowers the validation loss of the same run, each its own way: the same
    settings end in different adapters (one optimizer standing in for all would not)."""
    ends = {}
    for optimizer in trainer.OPTIMIZERS:
        decay = () if optimizer == "adam" else ("--weight-decay", "0.01")  # adamw without it is adam
        log = run_training(tiny_llama[0], data, tmp_path / optimizer / "a.npz", "--optimizer", optimizer, *decay,
                           "--iters", "20", "--steps-per-eval", "20", "--learning-rate",
                           "1e-1" if optimizer == "sgd" else "1e-2")
        vals = [r["val_loss"] for r in log if "val_loss" in r]
        assert vals[-1] < vals[0] - 0.5, (optimizer, vals)
        ends[optimizer] = read_adapters(tmp_path / optimizer / "a.npz")["layers.1.attention.wq.lora_b"]
    for i, a in enumerate(trainer.OPTIMIZERS):
        for b in trainer.OPTIMIZERS[i + 1:]:
            assert not np.allclose(ends[a], ends[b]), (a, b)


def test_weight_decay_with_adam_is_refused(tiny_llama, data, tmp_path):
    with pytest.raises(UserError, match="adamw is adam with it"):
        run_training(tiny_llama[0], data, tmp_path / "a.npz", "--weight-decay", "0.1")


def test_full_fine_tuning_lowers_the_test_loss_and_its_model_folder_reloads(tiny_llama, data, tmp_path, capsys,
                                                                              monkeypatch):
    import loading

    model_dir = tiny_llama[0]
    adapter_file = tmp_path / "full.npz"
    run_training(model_dir, data, adapter_file, "--fine-tune-type", "full", "--iters", "20",
                 "--learning-rate", "3e-3", "--steps-per-eval", "20")
    monkeypatch.chdir(tmp_path / "..")  # no adapters.npz here: the default file is missing, the base is used

    def test_loss(model, *flags):
        capsys.readouterr()
        lora.main(["--model", model, *flags, "--test", "--data", data, "--test-batches", "-1"])
        return float(capsys.readouterr().out.split("Test loss ")[1].split(",")[0])

    base = test_loss(model_dir)
    tuned = test_loss(model_dir, "--adapter-file", str(adapter_file))
    assert tuned < base - 0.5
    folder = str(tmp_path / "full-model")
    assert test_loss(folder) == pytest.approx(tuned, abs=1e-4)
    saved = read_adapters(adapter_file)
    assert {k.split(".")[1] for k in saved} == {"0", "1"} and "layers.1.attention_norm.weight" in saved
    reloaded = loading.load_model(folder)[0]
    np.testing.assert_allclose(np.array(reloaded.layers[1].feed_forward.w2.weight.astype(mx.float32)),
                               saved["layers.1.feed_forward.w2.weight"], atol=1e-6)


def test_full_fine_tuning_of_a_quantized_layer_is_refused(tiny_llama, data, tmp_path):
    import convert

    convert.convert(tiny_llama[0], str(tmp_path / "q4"), quantize=True, q_group_size=32, q_bits=4)
    with pytest.raises(UserError, match="full fine-tuning trains every weight of layer 1, which is quantized"):
        run_training(str(tmp_path / "q4"), data, tmp_path / "a.npz", "--fine-tune-type", "full", "--lora-layers", "1")
