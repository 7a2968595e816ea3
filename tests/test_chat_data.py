"""Chat fine-tuning data: conversations through the model's chat template, loss on every
assistant turn and on nothing else, checked token by token against the rendering."""

import json

import numpy as np
import pytest

pytest.importorskip("tokenizers")

import dataset  # noqa: E402
from tokenizer import HFTokenizer  # noqa: E402
from utils import UserError  # noqa: E402
from helpers import CHATML, SMOLLM, byte_level_tokenizer  # noqa: E402

# SmolLM2's template adds a system turn when the conversation has none.
CONVERSATION = [{"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": "What is ReLU in mlx?"},
                {"role": "assistant", "content": "mlx.nn.ReLU Applies the Rectified Linear Unit."},
                {"role": "user", "content": "And softmax?"},
                {"role": "assistant", "content": "mlx.nn.Softmax Applies the Softmax function."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    byte_level_tokenizer(folder)
    return HFTokenizer(str(folder / "tokenizer.json"))


def loss_text(tokenizer, tokens, spans):
    """The text of the tokens that carry loss, span by span."""
    return [tokenizer.decode(tokens[start:end]) for start, end in spans]


@pytest.mark.parametrize("template", [CHATML, SMOLLM])
def test_every_assistant_turn_and_nothing_else_carries_loss(tokenizer, template):
    tokens, spans = dataset.tokenize_example({"messages": CONVERSATION}, tokenizer, False, "x", template)
    rendered = tokenizer.decode(tokens)
    assert rendered.count("<|im_start|>assistant\n") == 2 and rendered.endswith("<|im_end|>\n")
    # Each span is exactly one reply with the end of its turn: no header, no user or system text.
    assert loss_text(tokenizer, tokens, spans) == [m["content"] + "<|im_end|>\n"
                                                   for m in CONVERSATION if m["role"] == "assistant"]
    # Token by token: the mask make_batch builds marks exactly those tokens as targets.
    _, targets, mask = dataset.make_batch(dataset.Dataset("x", [tokens], [spans]), [0])
    counted = [int(t) for t, m in zip(np.array(targets[0]), np.array(mask[0])) if m]
    assert counted == [t for start, end in spans for t in tokens[start:end]]
    header = tokenizer.encode("<|im_start|>assistant\n", bos=False)
    for start, _ in spans:  # right after each assistant header
        assert tokens[start - len(header):start] == header


def test_prompt_and_completion_go_through_the_template_as_one_exchange(tokenizer):
    tokens, spans = dataset.tokenize_example({"prompt": "What is ReLU in mlx?", "completion": "mlx.nn.ReLU"},
                                             tokenizer, False, "x", CHATML)
    assert tokenizer.decode(tokens) == "<|im_start|>user\nWhat is ReLU in mlx?<|im_end|>\n" \
                                       "<|im_start|>assistant\nmlx.nn.ReLU<|im_end|>\n"
    assert loss_text(tokenizer, tokens, spans) == ["mlx.nn.ReLU<|im_end|>\n"]


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "message 1 has the unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
     "message 1's 'content' must be a string"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "message 1 must be an object"),
])
def test_bad_conversations_name_file_and_line(tokenizer, tmp_path, line, message):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(UserError, match=f"train.jsonl: line 2: {message}"):
        dataset.load_split(str(tmp_path), "train", tokenizer, 2048, False, CHATML)


def test_messages_without_a_template_are_an_error(tokenizer, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(UserError, match="line 1: 'messages' need a model with a chat template"):
        dataset.load_split(str(tmp_path), "train", tokenizer, 2048, False, None)


def test_a_conversation_longer_than_max_seq_length_is_cut_with_a_warning(tokenizer, tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    full = dataset.load_split(str(tmp_path), "train", tokenizer, 2048, False, CHATML)
    first_end = full.spans[0][0][1]
    cut = dataset.load_split(str(tmp_path), "train", tokenizer, first_end + 2, False, CHATML)
    assert len(cut.tokens[0]) == first_end + 2 and cut.spans[0] == [full.spans[0][0]]  # the second reply cut away
    assert "1 example(s) longer than --max-seq-length" in capsys.readouterr().err
    with pytest.raises(UserError, match="line 1: no reply left within --max-seq-length 5"):
        dataset.load_split(str(tmp_path), "train", tokenizer, 5, False, CHATML)
