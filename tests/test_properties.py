"""Property-based tests over random input: only clear errors, never crashes."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataset
import generate
import tokenizer as tokenizer_module
import utils
from checkpoints import make_tokenizer
from utils import UserError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tokenizer_module.SentencePieceTokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


@FAST
@given(lines=st.lists(st.one_of(st.binary(max_size=60),
                                st.text(max_size=40).map(lambda t: t.encode("utf-8")),
                                st.dictionaries(st.sampled_from(["text", "prompt", "completion", "x"]),
                                                st.one_of(st.text(max_size=20), st.integers(), st.none()),
                                                max_size=3).map(lambda d: json.dumps(d).encode())),
                      max_size=6))
def test_jsonl_reader_gives_objects_or_a_clear_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("j") / "train.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        for lineno, obj in utils.read_jsonl(str(path), max_line_bytes=50):
            assert isinstance(obj, dict) and 1 <= lineno <= max(len(lines), 1)
    except UserError as e:
        assert str(e).startswith(f"{path}: line ") or str(e).startswith(f"{path}: file")


@FAST
@given(obj=st.dictionaries(st.sampled_from(["text", "prompt", "completion"]),
                           st.one_of(st.text(max_size=30), st.integers(), st.lists(st.text(max_size=3))),
                           max_size=3),
       mask_prompt=st.booleans())
def test_tokenizing_any_example_gives_tokens_or_a_clear_error(tokenizer, obj, mask_prompt):
    try:
        tokens, spans = dataset.tokenize_example(obj, tokenizer, mask_prompt, "train.jsonl: line 1")
    except UserError as e:
        assert str(e).startswith("train.jsonl: line 1: ")
        return
    assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
    [(start, end)] = spans
    assert 1 <= start < end == len(tokens)  # at least the EOS target always counts


@FAST
@given(prompt=st.text(max_size=30), completion=st.text(min_size=1, max_size=30).filter(str.strip))
def test_masking_counts_exactly_the_completion(tokenizer, tmp_path_factory, prompt, completion):
    tokens, spans = dataset.tokenize_example({"prompt": prompt, "completion": completion}, tokenizer, True, "x")
    [(start, end)] = spans
    examples = dataset.Dataset("x", [tokens], [spans])
    _, targets, mask = dataset.make_batch(examples, [0])
    assert mask.sum().item() == len(tokens) - start and end == len(tokens)
    alone = tokenizer.encode(prompt)
    assert start == 1 or tokens[:start] == alone[:start]  # only tokens the prompt alone produces are masked


def streamed(tokenizer, prompt_ids, new_ids):
    detok = generate.StreamingDetokenizer(tokenizer, prompt_ids)
    chunks = [detok.add(t) for t in new_ids] + [detok.flush()]
    return chunks


@FAST
@given(text=st.text(max_size=40), split=st.integers(min_value=0, max_value=60))
def test_streamed_text_equals_the_full_decode(tokenizer, text, split):
    ids = tokenizer.encode(text)
    split = min(split, len(ids))
    chunks = streamed(tokenizer, ids[:split], ids[split:])
    # What the user sees, the prompt's text then the stream, is the full decode.
    assert tokenizer.decode(ids[:split]).rstrip("\ufffd") + "".join(chunks) == tokenizer.decode(ids)
    assert all("\ufffd" not in c for c in chunks[:-1]) or "\ufffd" in text


@FAST
@given(ids=st.lists(st.integers(min_value=0, max_value=319), max_size=30))
def test_streaming_any_token_sequence_never_crashes(tokenizer, ids):
    chunks = streamed(tokenizer, [tokenizer.bos_id], ids)
    assert "".join(chunks) == tokenizer.decode([tokenizer.bos_id] + ids)
