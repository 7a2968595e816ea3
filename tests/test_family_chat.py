"""The families' own chat templates and end tokens, through conversion: real templates
(tests/templates/) rendered in this toolkit's sandbox as transformers renders them, loss on every
assistant turn, the end tokens of each family's generation_config.json stopping generation; and the
shipped scripts and `bench.py qa` on a converted family model."""

import json
import os
import shutil
import subprocess
import sys
from typing import NamedTuple

import pytest
from helpers import ROOT, write_split
from hf_checkpoints import make_hf_model

import chat
import convert
import dataset
import generate
import loading
from utils import UserError

pytest.importorskip("transformers")

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


class Family(NamedTuple):
    flavour: str          # tests/hf_checkpoints.py's
    template: str         # in tests/templates/
    specials: list        # the special tokens, first in the vocabulary
    bos: str              # tokenizer_config.json's bos_token and eos_token, as the model ships them
    eos: str
    config_ends: list     # config.json's eos_token_id, then generation_config.json's (which wins)
    generation_ends: list
    turn_end: str         # what closes an assistant turn


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILIES = {
    "qwen2.5": Family("qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja", QWEN_SPECIALS, None, "<|im_end|>",
                      ["<|im_end|>"], ["<|im_end|>", "<|endoftext|>"], "<|im_end|>\n"),
    "qwen3": Family("qwen3", "Qwen-Qwen3-0.6B.jinja", QWEN_SPECIALS, None, "<|im_end|>",
                    ["<|im_end|>"], ["<|im_end|>", "<|endoftext|>"], "<|im_end|>\n"),
    "gemma2": Family("gemma2", "google-gemma-2-2b-it.jinja", GEMMA_SPECIALS, "<bos>", "<eos>",
                     ["<eos>", "<end_of_turn>"], ["<eos>", "<end_of_turn>"], "<end_of_turn>\n"),
    "gemma3": Family("gemma3_text", "google-gemma-3-4b-it.jinja", GEMMA_SPECIALS, "<bos>", "<eos>",
                     ["<eos>", "<end_of_turn>"], ["<eos>", "<end_of_turn>"], "<end_of_turn>\n"),
    # Phi-3.5's config.json says <|endoftext|>, its generation_config.json three ends, <|end|> first
    "phi3.5": Family("phi3", "microsoft-Phi-3.5-mini-instruct.jinja",
                     ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"],
                     "<s>", "<|endoftext|>", ["<|endoftext|>"], ["<|end|>", "<|assistant|>", "<|endoftext|>"],
                     "<|end|>\n"),
}

SYSTEM = {"role": "system", "content": "Answer in one line."}
EXCHANGES = [{"role": "user", "content": "What is ReLU in mlx?"},
             {"role": "assistant", "content": "mlx.nn.ReLU applies the rectified linear unit."},
             {"role": "user", "content": "And softmax?"},
             {"role": "assistant", "content": "mlx.nn.softmax normalizes the exponentials."}]
TEXT = " ".join(m["content"] for m in [SYSTEM] + EXCHANGES) + " You are Qwen, created by Alibaba Cloud."


def conversation(name):
    """A system turn (Gemma 2 refuses one) and two exchanges."""
    return EXCHANGES if name == "gemma2" else [SYSTEM] + EXCHANGES


def write_family_checkpoint(folder, family):
    """A tiny transformers checkpoint of the family with a byte-level tokenizer holding its special
    tokens, its real chat template, and its end tokens in config.json and generation_config.json;
    returns transformers' tokenizer of it."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=family.specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos)
    with open(os.path.join(TEMPLATES, family.template), encoding="utf-8") as f:
        fast.chat_template = f.read()
    fast.save_pretrained(folder)
    make_hf_model(folder, family.flavour, vocab_size=len(fast))
    ids = {name: fast.convert_tokens_to_ids(name) for name in family.specials}
    bos = {"bos_token_id": ids[family.bos]} if family.bos else {}
    for name, ends in (("config.json", family.config_ends), ("generation_config.json", family.generation_ends)):
        path = os.path.join(folder, name)
        with open(path) as f:
            config = json.load(f)
        config.pop("bos_token_id", None)
        config.update(bos, eos_token_id=[ids[e] for e in ends] if len(ends) > 1 else ids[ends[0]])
        with open(path, "w") as f:
            json.dump(config, f)
    return fast


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """family name -> (converted folder, transformers' tokenizer of its checkpoint), each built once."""
    built = {}

    def get(name):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            reference = write_family_checkpoint(str(root / "hf"), FAMILIES[name])
            convert.convert(str(root / "hf"), str(root / "mlx"), dtype="float32")
            built[name] = str(root / "mlx"), reference
        return built[name]
    return get


def tokenizer_and_template(folder):
    return loading.load_model(folder)[1], chat.load_template(folder)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_sandbox_renders_each_real_template_as_transformers_does(family_model, name, add_generation_prompt):
    folder, reference = family_model(name)
    tokenizer, template = tokenizer_and_template(folder)
    messages = conversation(name)
    text = chat.render(template, messages, tokenizer, add_generation_prompt)
    assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # the same tokens too: each special token in the text is one token
    assert tokenizer.encode(text, bos=False) == reference(text, add_special_tokens=False)["input_ids"]


def test_gemma_folds_a_system_turn_into_the_first_user_turn(family_model):
    tokenizer, template = tokenizer_and_template(family_model("gemma3")[0])
    assert chat.render(template, [SYSTEM] + EXCHANGES[:1], tokenizer) == \
        "<bos><start_of_turn>user\nAnswer in one line.\n\nWhat is ReLU in mlx?<end_of_turn>\n<start_of_turn>model\n"
    # Gemma 2's template refuses a system turn: one line, where transformers raises
    tokenizer, template = tokenizer_and_template(family_model("gemma2")[0])
    with pytest.raises(UserError, match="chat template TemplateError: System role not supported"):
        chat.render(template, [SYSTEM] + EXCHANGES[:1], tokenizer)


def test_qwen25_adds_its_default_system_prompt_and_qwen3_none(family_model):
    question = "<|im_start|>user\nWhat is ReLU in mlx?<|im_end|>\n<|im_start|>assistant\n"
    tokenizer, template = tokenizer_and_template(family_model("qwen2.5")[0])
    assert chat.render(template, EXCHANGES[:1], tokenizer) == \
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n" + question
    tokenizer, template = tokenizer_and_template(family_model("qwen3")[0])
    assert chat.render(template, EXCHANGES[:1], tokenizer) == question


def loss_texts(name):
    """The text of each span that carries loss: the reply and what closes its turn. A turn the template
    writes otherwise as the last one (Qwen3's empty thinking block, Phi-3's EOS after the last turn)
    ends at its end token; the last turn is the conversation's end, as written."""
    family, replies = FAMILIES[name], [m["content"] for m in EXCHANGES if m["role"] == "assistant"]
    if name == "qwen3":
        return [replies[0] + "<|im_end|>", "<think>\n\n</think>\n\n" + replies[1] + family.turn_end]
    if name == "phi3.5":
        return [replies[0] + "<|end|>", replies[1] + family.turn_end + family.eos]
    return [reply + family.turn_end for reply in replies]


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_falls_on_every_assistant_turn_and_what_closes_it(family_model, name):
    tokenizer, template = tokenizer_and_template(family_model(name)[0])
    tokens, spans = dataset.tokenize_example({"messages": conversation(name)}, tokenizer, False, "x", template)
    assert [tokenizer.decode(tokens[start:end]) for start, end in spans] == loss_texts(name)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_familys_end_tokens_are_read_and_stop_generation(family_model, name, monkeypatch):
    family = FAMILIES[name]
    model, tokenizer, _ = loading.load_model(family_model(name)[0])
    assert {tokenizer.piece(token) for token in tokenizer.eos_ids} == set(family.generation_ends)
    assert tokenizer.piece(tokenizer.eos_id) == family.eos  # the eos_token a template writes
    words = tokenizer.encode(" mlx.nn.ReLU", bos=False)
    for end in tokenizer.eos_ids:
        monkeypatch.setattr(generate, "generate_tokens",
                            lambda *_, end=end: iter(words + [end] + tokenizer.encode(" never", bos=False)))
        assert "".join(generate.stream_text(model, tokenizer, [0], 50)) == " mlx.nn.ReLU"


def _template(name):
    with open(os.path.join(TEMPLATES, FAMILIES[name].template), encoding="utf-8") as f:
        return f.read()


# A GGUF's end tokens, as llama.cpp's converter writes them for each family: the tokenizer's eos (and an
# eot where it sets one); llama.cpp ends generation at the other end-of-turn tokens it knows by name too.
GGUF_ENDS = {
    "qwen2.5": (QWEN_SPECIALS, {"eos": "<|im_end|>"}, ["<|im_end|>", "<|endoftext|>"]),
    "gemma3": (GEMMA_SPECIALS, {"eos": "<eos>"}, ["<eos>", "<end_of_turn>"]),
    "phi3.5": (FAMILIES["phi3.5"].specials, {"eos": "<|endoftext|>", "eot": "<|end|>"}, ["<|endoftext|>", "<|end|>"]),
}


@pytest.mark.parametrize("name", GGUF_ENDS)
def test_a_ggufs_end_tokens_are_its_eos_eot_and_those_llama_cpp_knows_by_name(name):
    from formats.gguf.config import special_tokens

    specials, written, ends = GGUF_ENDS[name]
    tokens = specials + ["mlx", ".nn", "end"]
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            **{f"tokenizer.ggml.{key}_token_id": tokens.index(text) for key, text in written.items()}}
    assert special_tokens(meta, len(tokens), "x.gguf")["eos_token_ids"] == [tokens.index(e) for e in ends]


def write_chat_data(folder):
    """Conversations in the shipped data's form, a few of each split."""
    for split in ("train", "valid", "test"):
        write_split(folder, split, [{"messages": [EXCHANGES[0], EXCHANGES[1]]}, {"messages": EXCHANGES[2:]}] * 2)
    return str(folder)


def run_script(script, env, *args):
    """A shipped script, run with this interpreter and `env` on top of ours."""
    return subprocess.run(["bash", os.path.join(ROOT, script), *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable, **env), check=False)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_the_shipped_scripts_train_and_answer_with_a_family_model(family_model, name, tmp_path):
    env = {"MODEL": family_model(name)[0], "DATA": write_chat_data(tmp_path / "data"),
           "ADAPTER_FILE": str(tmp_path / "adapters.npz"), "ITERS": "2", "BATCH_SIZE": "2"}
    trained = run_script("run-training.sh", env, "--warmup", "1", "--val-batches", "1", "--test-batches", "1")
    assert trained.returncode == 0, trained.stderr
    assert os.path.exists(env["ADAPTER_FILE"]) and "Test loss" in trained.stdout + trained.stderr
    answered = run_script("run-inference.sh", dict(env, MAX_TOKENS="4"))
    assert answered.returncode == 0, answered.stderr
    assert "tokens)" in answered.stderr


def test_the_training_script_runs_dpo_after_sft(family_model, tmp_path):
    """The worked example's two steps: run-training.sh, then TRAIN_MODE=dpo from its adapters on
    preference pairs; a mode it does not know is one line."""
    pairs = [{"prompt": [EXCHANGES[0]], "chosen": [EXCHANGES[1]], "rejected": [EXCHANGES[3]]},
             {"prompt": [EXCHANGES[2]], "chosen": [EXCHANGES[3]], "rejected": [EXCHANGES[1]]}] * 2
    for split in ("train", "valid", "test"):
        write_split(tmp_path / "pairs", split, pairs)
    env = {"MODEL": family_model("qwen3")[0], "DATA": write_chat_data(tmp_path / "data"), "ITERS": "2",
           "BATCH_SIZE": "2", "ADAPTER_FILE": str(tmp_path / "sft.npz")}
    flags = ("--warmup", "1", "--val-batches", "1", "--test-batches", "1")
    assert run_script("run-training.sh", env, *flags).returncode == 0
    dpo = dict(env, TRAIN_MODE="dpo", DATA=str(tmp_path / "pairs"), SFT_ADAPTER_FILE=env["ADAPTER_FILE"],
               ADAPTER_FILE=str(tmp_path / "dpo.npz"))
    trained = run_script("run-training.sh", dpo, *flags)
    assert trained.returncode == 0, trained.stderr
    assert os.path.exists(dpo["ADAPTER_FILE"]) and "rewards/accuracies" in trained.stdout + trained.stderr
    wrong = run_script("run-training.sh", dict(dpo, TRAIN_MODE="ppo"))
    assert wrong.returncode == 2 and "TRAIN_MODE must be sft, dpo or orpo" in wrong.stderr


@pytest.mark.parametrize("name", ["qwen2.5", "gemma3"])
def test_bench_qa_asks_a_family_model_through_its_template(family_model, name, tmp_path):
    results = tmp_path / "results.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--results", str(results), "qa",
                          "--model", family_model(name)[0], "--data", write_chat_data(tmp_path / "data"),
                          "--samples", "2"], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    qa = json.loads(results.read_text())["qa"]
    assert qa["train_name_before"].endswith("/2") and len(qa["test_answers_before"]) == 2


def test_bench_qa_asks_a_base_model_without_a_template_in_the_completions_form(family_model, tmp_path):
    """A base model (Gemma 3 270M's kind) has no chat template: qa prompts it with the completions
    data's plain "Q: ...\nA:" prompts, and refuses chat data in one line."""
    base = tmp_path / "base"
    shutil.copytree(family_model("gemma3")[0], base)
    os.remove(base / chat.TEMPLATE_FILE)
    completions = tmp_path / "completions"
    for split in ("train", "test"):
        write_split(completions, split, [{"prompt": "Q: What is mlx.nn?\nA:", "completion": " mlx.nn Layers."}] * 2)

    def qa(data):
        results = tmp_path / "results.json"
        run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--results", str(results), "qa",
                              "--model", str(base), "--data", str(data), "--samples", "2"],
                             capture_output=True, text=True, timeout=120, check=False)
        return run, (json.loads(results.read_text())["qa"] if run.returncode == 0 else None)

    run, scores = qa(completions)
    assert run.returncode == 0, run.stderr
    assert scores["test_name_before"].endswith("/2") and scores["test_answers_before"][0].startswith("Q: What is")
    run, _ = qa(write_chat_data(tmp_path / "chat"))
    assert run.returncode == 2 and "has no chat template" in run.stderr and "Traceback" not in run.stderr
