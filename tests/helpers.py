"""What several test modules share: data writers, runs of the scripts, references, comparisons.

Test modules import from here (and from checkpoints.py, hf_checkpoints.py, gguf_files.py, which
build checkpoints), never from each other.
"""

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import time

import mlx.core as mx
import numpy as np

import generate
import loading
import lora
from utils import read_jsonl


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LORA = os.path.join(ROOT, "lora.py")
FUSE = os.path.join(ROOT, "fuse.py")
TOKENS = np.random.default_rng(1).integers(3, 300, size=(2, 24))  # the rows fused models are compared on


# ----------------------------------------------------------------------------------- generation

def sampled(model, prompt_tokens, seed, n=12, temp=1.5):
    """n tokens drawn at temperature `temp` after mx.random.seed(seed): the same seed must give
    the same tokens, another seed other ones (a stronger check of determinism than greedy)."""
    mx.random.seed(seed)
    tokens = generate.generate_tokens(model, prompt_tokens, generate.Sampler(temp=temp))
    return [int(next(tokens)) for _ in range(n)]


# ------------------------------------------------------------ fine-tuning data and runs of lora.py


NAMES, THINGS = ["Tom", "Lily", "Ben", "Anna"], ["ball", "cat", "tree", "boat", "cake"]


def story(rng):
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    return f"{n} had a {t}. {n} loved the {t} and played with the {t} in the park."


def write_split(folder, split, lines):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def write_dataset(folder, n_train=24, n_valid=8, n_test=8, seed=0):
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        write_split(folder, split, [{"text": story(rng)} for _ in range(n)])
    return str(folder)


def run_training(model_dir, data, adapter_file, *flags):
    argv = ["--model", model_dir, "--train", "--data", data, "--adapter-file", str(adapter_file),
            "--iters", "40", "--batch-size", "4", "--learning-rate", "1e-2", "--lora-layers", "2",
            "--steps-per-report", "5", "--steps-per-eval", "20", "--save-every", "10", *flags]
    lora.main(argv)
    return [record for _, record in read_jsonl(os.path.splitext(adapter_file)[0] + ".metrics.jsonl")]


# ------------------------------------------------------- data-parallel runs: two ranks on this machine


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_ranks(args, tmp_path, ranks=(0, 1), world=2, env=None, script=LORA):
    """`script` (lora.py) on each of `ranks` of a `world`-rank ring over loopback, as mlx.launch starts it:
    MLX_RANK and MLX_HOSTFILE. One thread each, as two ranks share this machine's two cores."""
    hostfile = tmp_path / "hosts.json"
    if not hostfile.exists():
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(world)]))
    base = dict(os.environ, MLX_HOSTFILE=str(hostfile), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **(env or {}))
    return [subprocess.Popen([sys.executable, script, *args], env=dict(base, MLX_RANK=str(rank)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in ranks]


def finish(procs, timeout=300):
    """[(returncode, stderr)] of every rank."""
    return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]



# ---------------------------------------------------------------- pretraining corpora and settings


SENTENCES = ["The cat sat on the mat.", "A dog ran in the park.", "Birds sing in the morning.",
             "Lily has a red ball.", "Tom reads a big book.", "The sun is warm today."]


def write_corpus(folder, n_docs=60, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_docs), ("valid", 8)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(SENTENCES, 4))}) + "\n")
    return str(folder)


TINY = ["--vocab-size", "300", "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
        "--hidden-dim", "160", "--context", "32", "--batch-size", "8", "--warmup", "5",
        "--learning-rate", "3e-3", "--min-learning-rate", "3e-4", "--steps-per-report", "5",
        "--steps-per-eval", "20", "--dtype", "float32"]


# --------------------------------------- adapters compared bit for bit, runs followed step by step


def read_adapters(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def wait_for_step(metrics_path, step, proc, timeout=120):
    """Block until the run has logged `step` (metrics are flushed every report)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                steps = [json.loads(line).get("step", 0) for line in f if line.strip()]
            if steps and max(steps) >= step:
                return
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("training did not reach the step in time")


# -------------------------------------------- tokenizers and chat templates of today's checkpoints


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# SmolLM2's own template: a default system turn when the conversation has none.
SMOLLM = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


SAMPLES = ["Once upon a time", "héllo wörld, naïve café", "日本語のテキストと中文", "emoji 🙂🎉 and 👩‍👩‍👧",
           "  two  spaces\tand\ttabs\n\nnewlines", "<|im_start|>user\nhi<|im_end|>", "x<|im_end|>y", "Ünïcödé ß→∑ ✓"]


def byte_level_tokenizer(folder):
    """A byte-level BPE tokenizer.json trained here, with ChatML's specials and template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Once upon a time there was a little girl named Lily."] * 20 + SAMPLES, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


# ---------------------------------------------- a fake installed package for cwk_create_dataset.py


FAKEPKG = {
    "__init__.py": '''
        """A fake package for the dataset tests.

        It re-exports :class:`~fakepkg.layers.activations.ReLU` and :func:`relu`.
        """
        from fakepkg.layers.activations import ReLU, relu
    ''',
    "layers/__init__.py": '''
        """Neural network layers, one module per family."""
        from fakepkg.layers.activations import ReLU
    ''',
    "layers/activations.py": '''
        """Activation functions and layers."""


        class ReLU:
            """Applies the Rectified Linear Unit.

            Simply ``maximum(x, 0)``. See :func:`relu` for the functional
            equivalent, and :class:`the tensor type <fakepkg.ops.Tensor>`.

            .. note::
               Works on any :class:`~fakepkg.ops.Tensor`.

            .. versionadded:: 0.2
            """

            def forward(self, x):
                """Apply the activation to ``x`` elementwise."""

            @property
            def name(self):
                """The display name of the layer."""
                return "relu"

            def undocumented(self):
                pass

            def _helper(self):
                """A private method, never an example."""


        def relu(x, scale=1.0):
            """The functional form of :class:`ReLU`.

            Example::

                relu(3)


            Returns ``max(x, 0) * scale``.
            """


        def tiny():
            """Tiny."""


        def _hidden():
            """A private function, never an example."""
    ''',
    "ops.py": textwrap.dedent(
        '''
        """Array operations."""


        class Tensor:
            """A minimal tensor type for the tests."""

            def reshape(self, *shape):
                """Return the tensor with a new shape."""


        def reshape(tensor, shape):
            """Reshape ``tensor`` to ``shape``, as `NumPy <https://numpy.org>`_ does."""
        '''
    )
    + "".join(f'\n\ndef op{i:02d}(x):\n    """Operation number {i} on tensors."""\n' for i in range(20)),
    "compiled.py": '''
        """Functions written in C, as far as the tests can tell."""
        import types

        random = types.ModuleType("fakepkg.compiled.random", "Random sampling functions.")


        def _normal(shape):
            pass


        # What a compiled function looks like: no file for its module, the call line in its docstring.
        _normal.__doc__ = "normal(shape: tuple) -> Tensor\\n\\nDraw samples from a normal distribution."
        _normal.__name__ = _normal.__qualname__ = "normal"
        _normal.__module__ = "fakepkg.compiled.random"
        random.normal = _normal
    ''',
    "longdoc.py": f'''
        """Docstrings longer than the tests' --seq-limit of 300 characters."""


        def essay():
            """An essay in three paragraphs.

            {"The second paragraph still fits within the limit. " * 3}

            {"The third paragraph goes past the limit and is cut away. " * 4}
            """


        def wall():
            """{"word " * 80}"""
    ''',
    "tests/__init__.py": "",
    "tests/test_fake.py": '''
        def test_nothing():
            """A test's docstring, never an example."""
    ''',
    "_private.py": '''
        def hidden():
            """A private module's function, never an example."""
    ''',
}


def write_package(root, name, files):
    for relative, source in files.items():
        path = os.path.join(root, name, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(source).lstrip())


# --------------------------------------------------------------- float64 references of the kernels


def f64(a):
    return np.array(a).astype(np.float64)


def rope_float64(x, dims, traditional, base, offset):
    X = f64(x)
    half = dims // 2
    theta = (offset + np.arange(X.shape[-2]))[:, None] * base ** (-np.arange(half) / half)  # [T, half]
    a = np.arange(half) * 2 if traditional else np.arange(half)
    b = a + 1 if traditional else a + half
    out = X.copy()
    out[..., a] = X[..., a] * np.cos(theta) - X[..., b] * np.sin(theta)
    out[..., b] = X[..., a] * np.sin(theta) + X[..., b] * np.cos(theta)
    return out


def attention_float64(q_BNTH, k_BKSH, v_BKSH, scale):
    """softmax(scale q k^T) v with no mask, the N // K query heads of a key-value head together."""
    rep = q_BNTH.shape[1] // k_BKSH.shape[1]
    Q, K, V = f64(q_BNTH), np.repeat(f64(k_BKSH), rep, axis=1), np.repeat(f64(v_BKSH), rep, axis=1)
    scores = Q @ K.swapaxes(-1, -2) * scale
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True) @ V


# -------------------------------------------------------------------- llama.cpp's own computations


def hf_llama3_factors(theta, head_dim, factor, low, high, old):
    """rope_freqs as llama.cpp's convert_hf_to_gguf computes them (float32 frequencies)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs.astype(np.float32):
        wavelen = 2 * np.pi / float(freq)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


# ----------------------------------------------------------------------------------- fine-tunes and exports

def logits(model, tokens=TOKENS):
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def torch_logits(model, tokens=TOKENS):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def trained(root, flavour, quantize=False, *flags, n_layers=2):
    """A tiny transformers checkpoint with a byte-level tokenizer and a chat template, converted
    (float32, or 4-bit in groups of 32), and LoRA adapters on every linear trained on it (more
    lora.py `flags`: DoRA, say)."""
    import convert
    from hf_checkpoints import make_hf_model

    reference = byte_level_tokenizer(root / "hf")
    make_hf_model(root / "hf", flavour, vocab_size=len(reference), n_layers=n_layers)
    model_dir = str(root / "mlx")
    convert.convert(str(root / "hf"), model_dir, dtype="float32", quantize=quantize, q_bits=4, q_group_size=32)
    data = write_dataset(root / "data", n_train=12, n_valid=4, n_test=4)
    lora.main(["--model", model_dir, "--train", "--data", data, "--adapter-file", str(root / "ad" / "a.npz"),
               "--iters", "12", "--batch-size", "4", "--learning-rate", "5e-3", "--lora-layers", "2",
               "--lora-targets", "all", "--lora-rank", "4", "--steps-per-eval", "12", "--val-batches", "1", *flags])
    return model_dir, str(root / "ad" / "a.npz")


def adapted_logits(model_dir, adapter_file):
    model, _, _ = loading.load_model(model_dir, adapter_file=adapter_file)
    return logits(model)


def run_fuse(*args):
    return subprocess.run([sys.executable, FUSE, *map(str, args)], capture_output=True, text=True, timeout=600)


def gguf_model(path):
    """transformers' own GGUF loader (the gguf package dequantizes): model and tokenizer."""
    import torch
    import transformers

    where = dict(pretrained_model_name_or_path=os.path.dirname(path), gguf_file=os.path.basename(path))
    return (transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(**where))


def gate_float64(A, gelu):
    """(act(A), d act(A) / dA) in float64 of the feed-forward's gate: silu, or the tanh GELU."""
    if not gelu:
        s = 1 / (1 + np.exp(-A))
        return A * s, s * (1 + A * (1 - s))
    k = np.sqrt(2 / np.pi)
    t = np.tanh(k * (A + 0.044715 * A ** 3))
    return 0.5 * A * (1 + t), 0.5 * (1 + t) + 0.5 * A * (1 - t * t) * k * (1 + 3 * 0.044715 * A ** 2)


def assert_hugging_face_export_is_the_adapted_model(flavour, model_dir, adapter_file, out):
    """fuse.py --format hf over a fine-tune, read by transformers: the adapted model's logits."""
    import transformers

    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--save-path", out, "--format", "hf",
                   "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert exported.config.model_type == flavour
    expected = adapted_logits(model_dir, adapter_file)
    assert np.abs(torch_logits(exported.float().eval()) - expected).max() <= 1e-4
    assert np.abs(logits(loading.load_model(model_dir)[0]) - expected).max() > 1e-2  # the adapters matter


def assert_peft_export_is_the_adapted_model(model_dir, adapter_file, out):
    """fuse.py --peft-path over a fine-tune of a transformers checkpoint (beside the model folder,
    in hf/), read by peft over that checkpoint: the adapted model's logits."""
    import peft
    import transformers

    run = run_fuse("--model", model_dir, "--adapter-file", adapter_file, "--peft-path", out)
    assert run.returncode == 0, run.stderr
    base_dir = os.path.join(os.path.dirname(model_dir), "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").float()
    adapted = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert np.abs(torch_logits(adapted) - adapted_logits(model_dir, adapter_file)).max() <= 1e-4
