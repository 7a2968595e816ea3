"""cwk_create_dataset.py: docstrings of a small package built here become a clean, split dataset."""

import json
import os
import subprocess
import sys

import pytest

import cwk_create_dataset as cwk
from utils import read_jsonl
from helpers import FAKEPKG, write_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "cwk_create_dataset.py")


WILDPKG = {
    "__init__.py": '"""A package with badly behaved modules."""',
    "broken.py": 'raise RuntimeError("boom on import")',
    "hang.py": "import time\ntime.sleep(600)",
    "quitter.py": "import sys\nsys.exit(3)",
    "crasher.py": "import os\nos._exit(9)",
    "noisy.py": '''
        import os
        import sys

        print("NOISE FROM PRINT")
        os.write(1, b"NOISE FROM FD\\n")
        sys.stderr.write("NOISE ON STDERR\\n")


        def shout():
            """Shout a greeting at the user."""
    ''',
}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    write_package(root, "fakepkg", FAKEPKG)
    write_package(root, "wildpkg", WILDPKG)
    return root


def run_script(packages, *args):
    env = dict(os.environ, PYTHONPATH=str(packages))
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=packages, env=env, capture_output=True, text=True, timeout=120
    )


def build(packages, out, *args):
    """Run the script into `out` (in the "text" format unless `args` say another); return
    (stdout, {split: [example]})."""
    fmt = [] if "--format" in args else ["--format", "text"]
    result = run_script(packages, "--out", str(out), "--seq-limit", "300", "--import-timeout", "2", *fmt, *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar off a terminal, and nothing from imported modules
    return result.stdout, read_splits(out)


def read_splits(out):
    return {name: [obj for _, obj in read_jsonl(os.path.join(out, f"{name}.jsonl"))] for name in cwk.SPLITS}


def answers_by_question(splits):
    examples = [example["text"] for split in splits.values() for example in split]
    pairs = [text.split("\n", 1) for text in examples]
    return {question: answer for question, answer in pairs}


@pytest.fixture(scope="module")
def built(packages):
    return build(packages, packages / "both", "--packages", "fakepkg", "wildpkg", "--workers", "2")


def test_documented_objects_become_cleaned_examples(built):
    _, splits = built
    answers = answers_by_question(splits)
    assert answers["Q: What is ReLU in fakepkg?"] == (
        "A: fakepkg.ReLU Applies the Rectified Linear Unit.\n\n"
        "Simply `maximum(x, 0)`. See `relu` for the functional\n"
        "equivalent, and `the tensor type`.\n\n"
        "Note: Works on any `Tensor`.\n\n"
        "New in version 0.2."
    )
    assert answers["Q: What is relu in fakepkg?"] == (
        "A: fakepkg.relu(x, scale=1.0) The functional form of `ReLU`.\n\n"
        "Example:\n\n    relu(3)\n\nReturns `max(x, 0) * scale`."
    )
    assert answers["Q: What is forward in fakepkg?"] == (
        "A: fakepkg.ReLU.forward(self, x) Apply the activation to `x` elementwise."
    )
    assert answers["Q: What is name in fakepkg?"] == "A: fakepkg.ReLU.name The display name of the layer."
    assert answers["Q: What is ops.reshape in fakepkg?"] == (
        "A: fakepkg.ops.reshape(tensor, shape) Reshape `tensor` to `shape`, as NumPy (https://numpy.org) does."
    )
    assert answers["Q: What is Tensor.reshape in fakepkg?"] == (
        "A: fakepkg.ops.Tensor.reshape(self, *shape) Return the tensor with a new shape."
    )
    assert answers["Q: What is layers in fakepkg?"] == (
        "A: fakepkg.layers Neural network layers, one module per family."
    )
    assert answers["Q: What is op07 in fakepkg?"] == "A: fakepkg.ops.op07(x) Operation number 7 on tensors."


def test_compiled_submodules_and_call_lines_are_read(built):
    answers = answers_by_question(built[1])
    assert answers["Q: What is random in fakepkg?"] == "A: fakepkg.compiled.random Random sampling functions."
    assert answers["Q: What is normal in fakepkg?"] == (
        "A: fakepkg.compiled.random.normal(shape: tuple) -> Tensor Draw samples from a normal distribution."
    )


def test_each_object_appears_once_under_its_shortest_public_path(built):
    texts = [example["text"] for split in built[1].values() for example in split]
    assert len(texts) == len(set(texts))
    # ReLU is reached as fakepkg.ReLU, fakepkg.layers.ReLU and fakepkg.layers.activations.ReLU.
    assert sum("Applies the Rectified Linear Unit" in text for text in texts) == 1
    heads = [text.split("\n")[1].split(" ")[1] for text in texts]
    assert "fakepkg.ReLU" in heads
    assert "fakepkg.layers.ReLU" not in heads and "fakepkg.layers.activations.ReLU" not in heads


def test_private_test_trivial_and_undocumented_objects_are_left_out(built):
    everything = json.dumps(built[1])
    for absent in ["never an example", "Tiny.", "undocumented", "_helper", "_hidden"]:
        assert absent not in everything
    for markup in [":class:", ":func:", "``", ".. note", ".. versionadded", "::"]:
        assert markup not in everything


def test_long_docstrings_are_cut_at_a_paragraph_or_dropped(built):
    stdout, splits = built
    answers = answers_by_question(splits)
    essay = answers["Q: What is essay in fakepkg?"]
    assert essay.endswith("The second paragraph still fits within the limit.")
    assert "third paragraph" not in essay
    assert "Q: What is wall in fakepkg?" not in answers  # one 400-character sentence: no place to cut
    assert "longer than 300 characters: 1 cut at a paragraph or sentence end, 1 dropped" in stdout


def test_broken_modules_are_reported_and_skipped(built):
    stdout, splits = built
    assert "Skipped modules (4):" in stdout
    assert "wildpkg.broken: RuntimeError: boom on import" in stdout
    assert "wildpkg.crasher: worker process died (exit code 9)" in stdout
    assert "wildpkg.hang: import timed out after 2 s" in stdout
    assert "wildpkg.quitter: SystemExit: 3" in stdout
    assert "wildpkg: 2 modules read, 4 skipped, 2 examples" in stdout
    assert "Test modules not read: 2" in stdout
    # The noisy module is read, and its prints reach neither the report nor the data.
    assert "A: wildpkg.noisy.shout() Shout a greeting at the user." in answers_by_question(splits).values()
    assert "NOISE" not in stdout + json.dumps(splits)


def split_questions(splits):
    return {name: set(answers_by_question({name: examples})) for name, examples in splits.items()}


def test_splits_keep_objects_apart_and_follow_the_sizes(packages):
    _, splits = build(packages, packages / "sizes", "--packages", "fakepkg", "wildpkg",
                      "--test-size", "0.2", "--valid-size", "0.1")
    questions = split_questions(splits)
    assert not questions["train"] & questions["valid"]
    assert not questions["train"] & questions["test"]
    assert not questions["valid"] & questions["test"]
    total = sum(len(examples) for examples in splits.values())
    assert (len(splits["test"]), len(splits["valid"])) == (round(total * 0.2), round(total * 0.1))


def test_same_input_gives_byte_identical_files_with_any_worker_count(packages, built):
    build(packages, packages / "again", "--packages", "fakepkg", "wildpkg", "--workers", "1", "--batch-size", "3")
    for name in cwk.SPLITS:
        first = (packages / "both" / f"{name}.jsonl").read_bytes()
        assert first == (packages / "again" / f"{name}.jsonl").read_bytes(), name


def test_seed_changes_the_assignment_but_not_the_examples(packages, built):
    _, seed0 = build(packages, packages / "seed0", "--packages", "fakepkg")
    _, seed1 = build(packages, packages / "seed1", "--packages", "fakepkg", "--seed", "1")
    assert split_questions(seed0) != split_questions(seed1)  # other objects in each split, not just another order
    assert answers_by_question(seed0) == answers_by_question(seed1)
    fakepkg_only = {q: a for q, a in answers_by_question(built[1]).items() if q.endswith("in fakepkg?")}
    assert answers_by_question(seed0) == fakepkg_only


def test_completions_format_splits_each_text_into_prompt_and_completion(packages):
    _, texts = build(packages, packages / "text", "--packages", "fakepkg")
    _, pairs = build(packages, packages / "completions", "--packages", "fakepkg", "--format", "completions")
    for name in cwk.SPLITS:
        assert [pair["prompt"] + pair["completion"] for pair in pairs[name]] == [t["text"] for t in texts[name]]
    first = pairs["train"][0]
    assert first["prompt"].startswith("Q: What is ") and first["prompt"].endswith("?\nA:")
    assert first["completion"].startswith(" fakepkg.")


def test_chat_format_is_one_user_question_and_the_answer(packages):
    _, texts = build(packages, packages / "text-for-chat", "--packages", "fakepkg")
    _, chats = build(packages, packages / "chat", "--packages", "fakepkg", "--format", "chat")
    for name in cwk.SPLITS:  # the same objects in the same splits
        assert [f"Q: {c['messages'][0]['content']}\nA: {c['messages'][1]['content']}" for c in chats[name]] \
            == [t["text"] for t in texts[name]]
    first = chats["train"][0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"].startswith("What is ") and first[1]["content"].startswith("fakepkg.")


def test_no_preprocess_keeps_markup_and_every_import_path(packages):
    _, splits = build(packages, packages / "raw", "--packages", "fakepkg", "--no-preprocess")
    placed = {}
    for name, examples in splits.items():
        for example in examples:
            if "Applies the Rectified Linear Unit" in example["text"]:
                placed[example["text"].split("\n")[1].split(" ")[1]] = name
    assert set(placed) == {"fakepkg.ReLU", "fakepkg.layers.ReLU", "fakepkg.layers.activations.ReLU"}
    assert len(set(placed.values())) == 1  # one object, one split
    assert ":func:`relu`" in json.dumps(splits)


def test_existing_dataset_is_kept_unless_forced(packages):
    out = packages / "existing"
    out.mkdir()
    (out / "train.jsonl").write_text('{"text": "mine"}\n')
    refused = run_script(packages, "--packages", "fakepkg", "--out", str(out))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {out / 'train.jsonl'} already exists; pass --force to overwrite the dataset in {out}"
    ]
    assert (out / "train.jsonl").read_text() == '{"text": "mine"}\n'
    forced = run_script(packages, "--packages", "fakepkg", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "mine" not in (out / "train.jsonl").read_text()
    assert sorted(os.listdir(out)) == ["test.jsonl", "train.jsonl", "valid.jsonl"]  # no temporary files left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--packages", "nosuchpkg"], "error: unknown package: nosuchpkg (is it installed in this Python?)"),
        (["--packages", "fakepkg.ops"], "error: --packages takes top-level package names such as mlx or numpy"),
        (["--test-size", "0.5", "--valid-size", "0.5"], "error: --test-size plus --valid-size must be below 1"),
        (["--workers", "0"], "error: --workers must be at least 1 and at most 64, got 0"),
    ],
)
def test_bad_input_is_one_line_error(packages, args, message):
    result = run_script(packages, "--out", str(packages / "never"), *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(message)
    assert not (packages / "never").exists()


def test_rst_markup_becomes_plain_text():
    doc = """Summary with :py:meth:`~pkg.Class.method`, :math:`x^2` and :ref:`the guide <guide>`.

    .. warning:: Mind the gap.

    .. code-block:: python

       x = 1

    .. image:: picture.png
       :width: 100

    .. a comment that is dropped

    Parameters
    ----------
    x : int
        A number, see [1]_ and `Python`_.
    """
    assert cwk.clean_docstring(doc) == (
        "Summary with `method`, x^2 and the guide.\n\n"
        "Warning: Mind the gap.\n\n"
        "```python\nx = 1\n```\n\n"
        "Parameters:\nx : int\n    A number, see [1] and Python."
    )


def test_summary_written_right_after_the_quotes_is_its_own_paragraph():
    # mlx.nn.ReLU's docstring, as written.
    doc = "Applies the Rectified Linear Unit.\n        Simply ``mx.maximum(x, 0)``.\n\n    See :func:`relu`.\n    "
    assert cwk.clean_docstring(doc) == "Applies the Rectified Linear Unit.\n\nSimply `mx.maximum(x, 0)`.\n\nSee `relu`."


def test_call_lines_are_split_from_prose_only_when_they_stand_alone():
    assert cwk.split_call_lines("f(a) -> int\nf(b) -> int\n\nDoes f.", {"f"}) == (
        ["f(a) -> int", "f(b) -> int"],
        "\nDoes f.",
    )
    assert cwk.split_call_lines("f(a) computes things.\nMore.", {"f"}) == ([], "f(a) computes things.\nMore.")


def test_fit_to_limit_prefers_paragraphs_then_sentences():
    assert cwk.fit_to_limit("One.\n\nTwo two.", 10) == "One."
    assert cwk.fit_to_limit("One. Two two two.", 10) == "One."
    assert cwk.fit_to_limit("no end here at all", 10) == ""
    assert cwk.fit_to_limit("Code:\n\n```\na\n\nb\n```", 14) == "Code:"  # never inside a fence


def test_short_names_are_the_shortest_unambiguous_tails():
    names = cwk.short_names({("p", "p.core.reshape"), ("p", "p.core.array.reshape"), ("p", "p.nn.ReLU")})
    assert names == {
        ("p", "p.core.reshape"): "core.reshape",
        ("p", "p.core.array.reshape"): "array.reshape",
        ("p", "p.nn.ReLU"): "ReLU",
    }


def test_shipped_data_documents_mlx_as_chat():
    splits = read_splits(os.path.join(ROOT, "data"))
    turns = [example["messages"] for split in splits.values() for example in split]
    assert all([m["role"] for m in t] == ["user", "assistant"] for t in turns)
    answers = {t[0]["content"]: t[1]["content"] for t in turns}
    assert answers["What is matmul in mlx?"].startswith("mlx.core.matmul(a: array, b: array")
    assert answers["What is ReLU in mlx?"].startswith("mlx.nn.ReLU Applies the Rectified Linear Unit.")
    assert answers["What is random.normal in mlx?"].startswith("mlx.core.random.normal(")
    assert len(turns) == len(answers) == 628  # every question once


def test_plain_format_is_the_answer_without_the_question(packages):
    _, texts = build(packages, packages / "text2", "--packages", "fakepkg")
    _, plain = build(packages, packages / "plain", "--packages", "fakepkg", "--format", "plain")
    for name in cwk.SPLITS:
        assert [p["text"] for p in plain[name]] == [t["text"].split("\nA: ", 1)[1] for t in texts[name]]


def test_a_path_that_is_another_objects_tail_keeps_its_full_name():
    names = cwk.short_names({("p", "p.a"), ("p", "p.p.a")})
    assert names == {("p", "p.a"): "p.a", ("p", "p.p.a"): "p.p.a"}


@pytest.mark.parametrize("fmt", ["text", "completions"])
def test_lora_trains_on_the_output(packages, tiny_llama, tmp_path, fmt):
    import lora

    out = packages / f"for_lora_{fmt}"
    build(packages, out, "--packages", "fakepkg", "wildpkg", "--format", fmt)
    flags = ["--mask-prompt"] if fmt == "completions" else []
    lora.main(["--model", tiny_llama[0], "--train", "--data", str(out), "--iters", "12", "--batch-size", "2",
               "--learning-rate", "1e-2", "--steps-per-eval", "12", "--adapter-file", str(tmp_path / "a.npz"),
               *flags])
    val = [json.loads(line)["val_loss"] for line in open(tmp_path / "a.metrics.jsonl") if "val_loss" in line]
    assert val[-1] < val[0]
