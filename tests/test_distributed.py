"""Data-parallel training over mx.distributed (ring backend, two ranks on this machine, started
with the host-file environment mlx.launch sets) and gradient accumulation: the same adapters
and losses as one process on the same global batch; a lost or missing peer ends the run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lora
import pretrain
from utils import read_jsonl
from helpers import (LORA, TINY, assert_same_bits, finish, free_ports, read_adapters, start_ranks, wait_for_step,
                     write_corpus, write_dataset)

ITERS = 8


def train_args(model_dir, data, adapter_file, *extra):
    # Dropout off: each rank draws its own masks, so only without it are the bits comparable.
    return ["--model", model_dir, "--train", "--data", data, "--adapter-file", str(adapter_file),
            "--iters", str(ITERS), "--batch-size", "4", "--learning-rate", "2e-3", "--lora-layers", "2",
            "--lora-targets", "all", "--steps-per-report", "2", "--steps-per-eval", "4", "--save-every", "4",
            "--val-batches", "-1", *extra]


def val_losses(adapter_file):
    metrics = os.path.splitext(str(adapter_file))[0] + ".metrics.jsonl"
    return [r["val_loss"] for _, r in read_jsonl(metrics) if "val_loss" in r]


def assert_close_adapters(got, expected):
    scale = max(np.abs(v).max() for v in expected.values())
    assert got.keys() == expected.keys()
    for k in expected:
        assert np.abs(got[k] - expected[k]).max() <= 1e-4 * scale, k


@pytest.fixture(scope="module")
def single(tiny_llama, tmp_path_factory):
    """One process, batch 4: the reference (adapters, validation losses)."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_dataset(root / "data", n_train=14, n_valid=6)
    adapter_file = root / "single" / "adapters.npz"
    lora.main(train_args(tiny_llama[0], data, adapter_file))
    return tiny_llama[0], data, read_adapters(adapter_file), val_losses(adapter_file)


def test_two_ranks_train_as_one_process_on_the_same_global_batch(single, tmp_path):
    model_dir, data, expected, expected_val = single
    adapter_file = tmp_path / "adapters.npz"
    results = finish(start_ranks(train_args(model_dir, data, adapter_file), tmp_path))
    assert [code for code, _ in results] == [0, 0], results[0][1] + results[1][1]
    assert "2 rank(s) x 1 micro-batch(es) of 2" in results[0][1]
    assert results[1][1] == ""  # rank 1 says nothing but its errors
    assert_close_adapters(read_adapters(adapter_file), expected)
    np.testing.assert_allclose(val_losses(adapter_file), expected_val, rtol=0, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "adapters-checkpoints")) == ["step-00000004.safetensors",
                                                                     "step-00000008.safetensors"]


def test_gradient_accumulation_matches_the_whole_batch(single, tmp_path, capsys):
    """2 micro-batches of 2 in one process, and 2 ranks x 2 micro-batches of 1."""
    model_dir, data, expected, expected_val = single
    accumulated = tmp_path / "one" / "adapters.npz"
    lora.main(train_args(model_dir, data, accumulated, "--grad-accumulation-steps", "2"))
    assert "4 examples in 1 rank(s) x 2 micro-batch(es) of 2" in capsys.readouterr().err
    assert_close_adapters(read_adapters(accumulated), expected)
    np.testing.assert_allclose(val_losses(accumulated), expected_val, rtol=0, atol=1e-5)
    both = tmp_path / "two" / "adapters.npz"
    results = finish(start_ranks(train_args(model_dir, data, both, "--grad-accumulation-steps", "2"), tmp_path))
    assert [code for code, _ in results] == [0, 0], results[0][1] + results[1][1]
    assert "4 examples in 2 rank(s) x 2 micro-batch(es) of 1" in results[0][1]
    assert_close_adapters(read_adapters(both), expected)


def test_pretraining_on_two_ranks_is_pretraining_on_one(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    args = ["--corpus", corpus, *TINY, "--iters", "6", "--save-every", "6"]
    pretrain.main([*args, "--out", str(tmp_path / "one")])
    script = os.path.join(os.path.dirname(LORA), "pretrain.py")
    results = finish(start_ranks([*args, "--out", str(tmp_path / "two")], tmp_path, script=script))
    assert [code for code, _ in results] == [0, 0], results[0][1] + results[1][1]
    one, two = (read_adapters(tmp_path / name / "weights.npz") for name in ("one", "two"))
    assert_close_adapters(two, one)


def test_a_batch_that_does_not_split_is_refused(single, tmp_path, capsys):
    model_dir, data, _, _ = single
    import utils

    code = utils.exit_code(lambda: lora.main(train_args(model_dir, data, tmp_path / "a.npz", "--batch-size", "3",
                                                        "--grad-accumulation-steps", "2")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--batch-size 3 does not split into 1 rank(s) x 2" in err


def test_sigkill_of_both_ranks_then_resume_is_bit_identical(single, tmp_path):
    model_dir, data, _, _ = single
    reference = tmp_path / "reference" / "adapters.npz"
    assert [code for code, _ in finish(start_ranks(train_args(model_dir, data, reference), tmp_path))] == [0, 0]
    adapter_file = tmp_path / "killed" / "adapters.npz"
    procs = start_ranks(train_args(model_dir, data, adapter_file), tmp_path)
    wait_for_step(str(adapter_file).replace(".npz", ".metrics.jsonl"), 5, procs[0])
    for p in procs:
        p.kill()
    finish(procs)
    results = finish(start_ranks(train_args(model_dir, data, adapter_file, "--resume", "latest"), tmp_path))
    assert [code for code, _ in results] == [0, 0], results[0][1] + results[1][1]
    assert "Resuming from" in results[0][1] and "step-00000004" in results[0][1]
    assert_same_bits(read_adapters(adapter_file), read_adapters(reference))


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(single, tmp_path):
    """SIGINT to rank 1 alone: both stop after one step, rank 0 writes the checkpoint, and the
    resumed run ends bit-identical to one never interrupted."""
    model_dir, data, _, _ = single
    long = ("--iters", "40", "--save-every", "40")
    reference = tmp_path / "reference" / "adapters.npz"
    assert [code for code, _ in finish(start_ranks(train_args(model_dir, data, reference, *long),
                                                   tmp_path))] == [0, 0]
    adapter_file = tmp_path / "stopped" / "adapters.npz"
    procs = start_ranks(train_args(model_dir, data, adapter_file, *long), tmp_path)
    wait_for_step(str(adapter_file).replace(".npz", ".metrics.jsonl"), 4, procs[0])
    procs[1].send_signal(signal.SIGINT)
    (code0, err0), (code1, _) = finish(procs, timeout=90)
    assert code0 == code1 == 128 + signal.SIGINT and "--resume latest" in err0, err0
    results = finish(start_ranks(train_args(model_dir, data, adapter_file, *long, "--resume", "latest"), tmp_path))
    assert [code for code, _ in results] == [0, 0], results[0][1] + results[1][1]
    assert_same_bits(read_adapters(adapter_file), read_adapters(reference))


def test_a_two_rank_checkpoint_resumed_by_one_process_says_so_and_ends_the_same(single, tmp_path, capsys):
    """Another split of the batch: the same steps, float summation order aside."""
    model_dir, data, _, _ = single
    reference = tmp_path / "reference" / "adapters.npz"
    assert [code for code, _ in finish(start_ranks(train_args(model_dir, data, reference), tmp_path))] == [0, 0]
    halfway = tmp_path / "halfway" / "adapters.npz"
    assert [code for code, _ in finish(start_ranks(train_args(model_dir, data, halfway, "--iters", "4"),
                                                   tmp_path))] == [0, 0]
    lora.main(train_args(model_dir, data, halfway, "--resume", "latest"))
    assert "split each batch into 2 rank(s) x 1 micro-batch(es), this one into 1 rank(s)" in capsys.readouterr().err
    assert_close_adapters(read_adapters(halfway), read_adapters(reference))


def test_a_rank_that_dies_ends_the_other_with_one_line(single, tmp_path):
    model_dir, data, _, _ = single
    adapter_file = tmp_path / "adapters.npz"
    procs = start_ranks(train_args(model_dir, data, adapter_file, "--iters", "100000", "--save-every", "100000"),
                        tmp_path)
    wait_for_step(tmp_path / "adapters.metrics.jsonl", 2, procs[0])
    procs[1].send_signal(signal.SIGKILL)
    tic = time.time()
    code, err = finish(procs[:1], timeout=90)[0]
    assert time.time() - tic < 30  # the lost peer is seen at once
    assert code == 2 and "another rank stopped" in err and "Traceback" not in err
    procs[1].wait()
    # Nothing half-written (no result was due), and neither the manifest, the metrics nor the lock stay.
    assert sorted(os.listdir(tmp_path)) == ["hosts.json"]


def test_ranks_given_different_data_refuse_to_start(single, tmp_path):
    model_dir, data, _, _ = single
    other = write_dataset(tmp_path / "other", n_train=14, n_valid=6, seed=1)
    args = train_args(model_dir, data, tmp_path / "out" / "a.npz")
    procs = start_ranks(args, tmp_path, ranks=(0,)) + start_ranks(
        [other if a == data else a for a in args], tmp_path, ranks=(1,))
    for code, err in finish(procs, timeout=120):
        assert code == 2 and "the ranks were given different training data" in err, err
    assert not os.path.exists(tmp_path / "out")


def test_under_mlx_launch_a_rank_that_dies_ends_the_run(single, tmp_path):
    """mlx.launch itself: rank 1 dies at step 3, rank 0 reports the lost peer in one line and the
    launcher returns (mlx 0.32's launcher exits 0 whatever its ranks did: docs/distributed.md says so)."""
    model_dir, data, _, _ = single
    die = os.path.join(os.path.dirname(os.path.abspath(__file__)), "die_at_step.py")
    # The launcher of this interpreter's MLX, beside it: a venv's python called without
    # activating the venv has no mlx.launch on PATH.
    launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    command = [launcher, "--backend", "ring", "-n", "2", "--starting-port", str(free_ports(1)[0]),
               sys.executable, die, "1", "3", *train_args(model_dir, data, tmp_path / "a.npz", "--iters", "100000")]
    tic = time.time()
    run = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert time.time() - tic < 30  # the lost peer is seen at once
    # The launcher interleaves its own colored warnings with the ranks' lines, one at times mid-line
    errors = [line for line in run.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "another rank stopped" in errors[0], run.stderr
    assert "Traceback" not in run.stderr


def test_a_peer_that_never_connects_ends_the_run_with_one_line(single, tmp_path):
    model_dir, data, _, _ = single
    tic = time.time()
    [(code, err)] = finish(start_ranks(train_args(model_dir, data, tmp_path / "a.npz"), tmp_path, ranks=(0,),
                                       env={"MLX_LORA_CONNECT_TIMEOUT": "5"}), timeout=90)
    assert code != 0 and "not every rank connected within 5 s" in err and err.strip().count("\n") == 0
    assert time.time() - tic < 60


def test_micro_batches_split_the_rows_of_a_batch_evenly_over_ranks():
    """A short last batch (5 rows over 2 ranks x 2) leaves a rank fewer rows, never a row twice."""
    import distributed
    import trainer

    split = {rank: trainer.micro_batches(5, distributed.World(None, rank, 2), 2) for rank in (0, 1)}
    assert split == {0: [(0, 1), (1, 2)], 1: [(2, 3), (3, 5)]}
    assert trainer.micro_batches(1, distributed.World(None, 1, 2), 1) == [(0, 1)]
    assert trainer.micro_batches(1, distributed.World(None, 0, 2), 1) == []
