"""Pretraining from scratch: blocks and masks, a loss that falls, and a model lora.py fine-tunes."""

import math
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

import lora
import loading
import generate
import pretrain
from utils import UserError, read_jsonl
from helpers import TINY, sampled, write_corpus, write_dataset


class FakeTokenizer:
    """Each character is one token (ord + 3), BOS 1, EOS 2: block layout is checkable by eye."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + [ord(c) + 3 for c in text] + [self.eos_id] * eos


def test_blocks_join_documents_with_bos_eos_and_mask_only_the_padding():
    docs = ["abc", "de", "fghij"]  # stream: 1 a b c 2 1 d e 2 1 f g h i j 2  (16 tokens)
    blocks, mask = pretrain.make_blocks(docs, FakeTokenizer(), context=6)
    stream = [1, 100, 101, 102, 2, 1, 103, 104, 2, 1, 105, 106, 107, 108, 109, 2]
    assert blocks.shape == (3, 7)  # ceil((16 - 1) / 6) blocks of context + 1
    np.testing.assert_array_equal(blocks[0], stream[0:7])
    np.testing.assert_array_equal(blocks[1], stream[6:13])  # stride context: each target once
    np.testing.assert_array_equal(blocks[2], stream[12:16] + [0, 0, 0])  # the tail padded, not dropped
    np.testing.assert_array_equal(mask[2], [1, 1, 1, 0, 0, 0])  # padding targets do not count
    assert mask[:2].all()
    assert mask.sum() == len(stream) - 1  # every real next-token target exactly once


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    corpus = write_corpus(root / "corpus")
    assert pretrain.main(["--corpus", corpus, "--out", str(root / "model"), "--iters", "80",
                          "--save-every", "40", *TINY]) == 0
    return root


def test_pretraining_lowers_the_loss(pretrained):
    records = metrics(pretrained / "model-work")
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[0] > math.log(300) - 1  # starts near uniform over the vocabulary
    assert val[-1] < 0.5 * val[0]
    assert (pretrained / "model-work" / "loss.png").stat().st_size > 0


def test_pretrained_model_has_convert_layout_and_generates_deterministically(pretrained):
    model, tokenizer, config = loading.load_model(str(pretrained / "model"))
    assert config["dim"] == 64 and config["vocab_size"] == tokenizer.vocab_size == 300
    prompt = tokenizer.encode("The cat")
    assert sampled(model, prompt, seed=1) == sampled(model, prompt, seed=1) != sampled(model, prompt, seed=2)
    tokens = generate.generate_tokens(model, prompt)
    greedy = [next(tokens) for _ in range(12)]
    assert tokenizer.decode(prompt + greedy).startswith("The cat sat on the")  # learned the corpus


def metrics(folder):
    return [record for _, record in read_jsonl(str(folder / "metrics.jsonl"))]


def test_pretraining_resumes_from_its_checkpoint(pretrained, tmp_path):
    """Extending the run by 10 steps from its step-80 checkpoint, in a copy (other tests share it)."""
    for name in ("model", "model-work"):
        shutil.copytree(pretrained / name, tmp_path / name)
    corpus, out = str(pretrained / "corpus"), str(tmp_path / "model")
    assert pretrain.main(["--corpus", corpus, "--out", out, "--iters", "90", "--save-every", "10",
                          "--resume", "latest", *TINY]) == 0
    records = metrics(tmp_path / "model-work")
    train_steps = [r["step"] for r in records if "train_loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 90
    # The restored weights and optimizer carry on: still far below the initial loss.
    val = [r["val_loss"] for r in records if "val_loss" in r]
    train = [r["train_loss"] for r in records if "train_loss" in r]
    assert train[-1] < 0.6 * val[0]
    with pytest.raises(UserError, match="--seed"):  # another data order cannot continue this run
        pretrain.main(["--corpus", corpus, "--out", out, "--iters", "100", "--resume", "latest",
                       "--seed", "7", *TINY])


def test_pretraining_resumed_from_the_middle_ends_bit_identical(pretrained, tmp_path):
    """Weights and both AdamW optimizers' moments and steps come back from the step-40 checkpoint
    (MultiOptimizer's state is a fresh dict on every access: restoring into it once did nothing)."""
    for name in ("model", "model-work"):
        shutil.copytree(pretrained / name, tmp_path / name)
    os.remove(tmp_path / "model-work" / "checkpoints" / "step-00000080.safetensors")
    assert pretrain.main(["--corpus", str(pretrained / "corpus"), "--out", str(tmp_path / "model"), "--iters", "80",
                          "--save-every", "40", "--resume", "latest", *TINY]) == 0
    resumed, uninterrupted = (mx.load(str(folder / "model" / "weights.npz")) for folder in (tmp_path, pretrained))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        np.testing.assert_array_equal(np.array(resumed[key]), np.array(uninterrupted[key]), err_msg=key)


def test_pretrained_model_fine_tunes_with_lora(pretrained, tmp_path):
    data = write_dataset(tmp_path / "data")
    lora.main(["--model", str(pretrained / "model"), "--train", "--data", data, "--iters", "20",
               "--adapter-file", str(tmp_path / "a.npz"), "--learning-rate", "1e-2", "--steps-per-eval", "20"])
    val = [r["val_loss"] for _, r in read_jsonl(str(tmp_path / "a.metrics.jsonl")) if "val_loss" in r]
    assert val[-1] < val[0]
