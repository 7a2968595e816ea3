"""The families' tokenizers: every tokenizer.ggml.pre llama.cpp writes for them splits text as
llama.cpp's regexes do, and Phi-3's SentencePiece vocabulary with its added tokens, both ways.

The references are llama.cpp's own patterns (src/llama-vocab.cpp), spelled here as upstream
spells them and run with the `regex` module, one after another as llama.cpp runs them.
"""

import json
import os

import numpy as np
import pytest
import regex
from gguf_files import byte_level_vocab

from checkpoints import ASSETS
from formats.gguf import vocabulary

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SEED_CODER = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+"
          r"((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + CONTRACTIONS + r"?|"
         r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + CONTRACTIONS + r"?|"
         r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
UPSTREAM = {
    "deepseek-llm": ["[\r\n]", "\\s?[" + DEEPSEEK_LETTERS + "]+",
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", "\\s+$", DEEPSEEK_CJK,
                     "\\p{N}+"],
    "deepseek-coder": ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", DEEPSEEK_CJK, "\\p{N}"],
    "deepseek-v3": ["\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?"
                     "[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")],
    "tekken": [TEKKEN],
    "gpt-4o": [GPT4O],
    "seed-coder": [SEED_CODER],
    "viking": [BLOOM, "\\p{N}"],
    "bloom": [BLOOM],
    "trillion": [GPT2],
    "mellum2": ["\\p{N}", GPT2],
    "grok-2": [QWEN2],
    "jina-v5-nano": [LLAMA3],
}
# llama.cpp's other names for the same regexes
SAME_AS = {"hunyuan-dense": "deepseek-v3", "joyai-llm": "deepseek-v3", "hy_v4": "deepseek-v3", "llama4": "gpt-4o",
           "kanana2": "gpt-4o", "talkie": "gpt-4o", "minimax-m2": "gpt-4o", "poro-chat": "bloom",
           "gpt3-finnish": "bloom", "a.x-4.0": "trillion", "mellum": "trillion", "gigachat": "trillion",
           "granite-docling": "trillion", "f2llmv2": "grok-2", "hunyuan": "grok-2", "solar-open": "grok-2"}
TRICKY = [
    "1234567 and 89.5, 1,000,000 and \u0661\u0662\u0663\u0664",
    "\u4f60\u597d\u4e16\u754c\u3053\u3093\u306b\u3061\u306f\u30ab\u30bf\u30ab\u30ca \ud55c\uad6d\uc5b4 \u0928\u092e\u0938\u094d\u0924\u0947",
    "I'm sure you'RE right, we'Ve DON'T it's a'lL",
    "line one\n\nline two\r\n   indented\n\t\ttabs  \n",
    "...!!!??? ----==== a/b//c /path/to/file.txt (x) [y] {z} @home #tag $5 ~50% <|im_start|>",
    "iPhone HTTPServer McDonald's fooBar \u00c9COLE Stra\u00dfe \u0391\u03b8\u03ae\u03bd\u03b1 \u041f\u0440\u0438\u0432\u0435\u0442",
    "emoji \U0001f680\U0001f600 \u2026 \u3002\uff0c\u3001 \u0928\u0939\u0940\u0902\u0964 \u0627\u0644\u0633\u0644\u0627\u0645\u060c trailing   ",
]


def llama_cpp_split(text, patterns):
    """The pieces llama.cpp makes: each regex in turn splits every piece so far, matches apart."""
    pieces = [text]
    for pattern in patterns:
        split = []
        for piece in pieces:
            at = 0
            for match in regex.finditer(pattern, piece):
                if match.end() > match.start():
                    split += [piece[at:match.start()]] if match.start() > at else []
                    split.append(match.group())
                    at = match.end()
            split += [piece[at:]] if at < len(piece) else []
        pieces = split
    return pieces


def byte_level_meta(pre):
    tokens, types, merges, _ = byte_level_vocab()
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.merges": merges}


def written_tokenizer(meta):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(vocabulary.tokenizer_files(meta, "tiny.gguf")["tokenizer.json"].decode("utf-8"))


@pytest.mark.parametrize("name", sorted(UPSTREAM) + sorted(SAME_AS))
def test_each_pre_tokenizer_splits_as_llama_cpp(name):
    """A tiny byte-level vocabulary with this tokenizer.ggml.pre: the tokenizer.json written for it
    splits digits, CJK, contractions, line breaks and punctuation into llama.cpp's pieces, and
    encodes and decodes the text back."""
    tokenizer = written_tokenizer(byte_level_meta(name))
    spelling = vocabulary.byte_spelling()
    for text in TRICKY:
        expected = ["".join(spelling[b] for b in piece.encode("utf-8"))
                    for piece in llama_cpp_split(text, UPSTREAM[SAME_AS.get(name, name)])]
        assert [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)] == expected, text
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_tekken_looks_whole_pieces_up_and_adds_bos():
    """Mistral Nemo's tekken, as llama.cpp reads it: a piece that is a token is taken whole before
    any merge (ignore_merges), and BOS is added when the file does not say."""
    from formats.gguf.config import special_tokens

    tokenizer = json.loads(vocabulary.tokenizer_files(byte_level_meta("tekken"), "t.gguf")["tokenizer.json"])
    assert tokenizer["model"]["ignore_merges"] is True
    assert json.loads(vocabulary.tokenizer_files(byte_level_meta("deepseek-llm"), "d.gguf")["tokenizer.json"]
                      )["model"]["ignore_merges"] is False
    meta = dict(byte_level_meta("tekken"), **{"tokenizer.ggml.bos_token_id": 0})
    assert special_tokens(meta, len(meta["tokenizer.ggml.tokens"]), "t.gguf")["add_bos_token"] is True


def test_every_pre_tokenizer_splits_the_probe_its_own_way():
    """A folder's tokenizer.json is named by how it splits PRE_PROBE: no two regex sets may agree there."""
    seen = {}
    for name, splits in vocabulary.PRE_SPLITS.items():
        pieces = vocabulary.probe_pieces(splits)
        assert seen.setdefault(pieces, splits) == splits, name


def hugging_face_pre_tokenizer(patterns, digits=None):
    """A tokenizer.json pre_tokenizer as DeepSeek's are written: Splits of the upstream patterns
    (optionally Digits in place of the last), then a ByteLevel without its own regex."""
    from tokenizers import Regex, pre_tokenizers

    steps = [pre_tokenizers.Split(Regex(p), "isolated") for p in (patterns if digits is None else patterns[:-1])]
    steps += [] if digits is None else [pre_tokenizers.Digits(individual_digits=digits)]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return json.loads(pre_tokenizers.Sequence(steps).__getstate__())


# Mistral Nemo's and Phi-4-mini's own tokenizer.json regexes (llama.cpp's comments quote them)
LETTER_CASES = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+CONTRACTION|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*CONTRACTION|")
HUGGING_FACE = {
    "tekken": [LETTER_CASES.replace("CONTRACTION", "") + r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-4o": [LETTER_CASES.replace("CONTRACTION", "(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
               + r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


@pytest.mark.parametrize("name, patterns, digits", [
    ("deepseek-llm", UPSTREAM["deepseek-llm"], None), ("deepseek-llm", UPSTREAM["deepseek-llm"], False),
    ("deepseek-coder", UPSTREAM["deepseek-coder"], True), ("deepseek-v3", UPSTREAM["deepseek-v3"], None),
    ("tekken", HUGGING_FACE["tekken"], None), ("gpt-4o", HUGGING_FACE["gpt-4o"], None),
    ("tekken", UPSTREAM["tekken"], None), ("seed-coder", UPSTREAM["seed-coder"], None),
    ("viking", UPSTREAM["viking"], None)])
def test_hugging_face_spellings_are_named_for_llama_cpp(name, patterns, digits):
    """DeepSeek's tokenizer.json (a Sequence of Splits, digits by Digits or a Split), Mistral Nemo's
    and Phi-4-mini's (letter cases by Unicode category, which llama.cpp approximates), and the
    other families' Splits get llama.cpp's name on the way out to GGUF."""
    ignore_merges = name == "tekken"
    assert vocabulary.pre_tokenizer_name(hugging_face_pre_tokenizer(patterns, digits), ignore_merges) == name


# ----------------------------------------------------------------------------- Phi-3's vocabulary

# Phi-3's added tokens, in its order after the SentencePiece pieces (32000-32010 in Phi-3 itself)
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
PHI3_VOCAB = 352  # the model's rows past the tokenizer's, as Phi-3's 32064
CHATS = ["<|user|>\nHi there<|end|>\n<|assistant|>\n",
         ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 12345 + 3.14?<|end|>\n<|assistant|>\nAbout 12348.<|end|>\n"
          "<|endoftext|> after the end")]


def phi3_gguf_meta(folder, original=None, n_vocab=PHI3_VOCAB):
    """A Phi-3 vocabulary as llama.cpp's converter writes it: the SentencePiece pieces, the added
    tokens (control, score -1000), then [PADn] tokens (unused, score -10000) up to the model's rows."""
    from gguf_files import sentencepiece_vocab

    pieces, scores, types, path = sentencepiece_vocab(folder, original)
    n_pads = n_vocab - len(pieces) - len(PHI3_ADDED)
    tokens = pieces + PHI3_ADDED + [f"[PAD{i}]" for i in range(n_vocab - n_pads, n_vocab)]
    meta = {"general.architecture": "phi3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.array(scores + [-1000.0] * len(PHI3_ADDED) + [-10000.0] * n_pads, np.float32),
            "tokenizer.ggml.token_type": np.array(types + [3] * len(PHI3_ADDED) + [5] * n_pads, np.int32),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": len(pieces)}
    return meta, path


@pytest.mark.parametrize("real", [False, True])
def test_a_phi3_gguf_vocabulary_encodes_as_phi3(tmp_path, real):
    """Its chat tokens are single ids and drop the line break after them (Phi-3's rstrip, which
    llama.cpp applies too); the text between encodes as the SentencePiece model does. Also with a
    real 32,000-piece model (Mistral's, the size of Phi-3's own), its chat tokens at 32000-32010."""
    import sentencepiece as spm

    from tokenizer import load_tokenizer

    real_model = os.path.join(ASSETS, "tokenizers", "mistral-7b-v0.1.model")
    if real and not os.path.exists(real_model):
        pytest.skip("../shared/assets/tokenizers is not available")
    meta, original = phi3_gguf_meta(tmp_path / "spm", *((real_model, 32064) if real else ()))
    (tmp_path / "out").mkdir()
    for name, content in vocabulary.tokenizer_files(meta, "phi3.gguf").items():
        (tmp_path / "out" / name).write_bytes(content)
    ours, sp = load_tokenizer(str(tmp_path / "out")), spm.SentencePieceProcessor(model_file=original)
    user, end, assistant = (len(sp) + PHI3_ADDED.index(t) for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    ids = ours.encode(CHATS[0], bos=False)
    assert ids == [user] + sp.encode("Hi there") + [end, assistant]
    assert [ours.piece(i) for i in (user, end, assistant)] == ["<|user|>", "<|end|>", "<|assistant|>"]
    assert ours.decode(ids) == "Hi there"  # control tokens decode to nothing, as SentencePiece's do
    assert ours.vocab_size == len(meta["tokenizer.ggml.tokens"]) and (user == 32010) == real
    # <|endoftext|> keeps the space after it; another architecture's vocabulary strips nothing
    assert ours.encode("<|endoftext|> x", bos=False) == [len(sp)] + sp.encode(" x")
    (tmp_path / "llama").mkdir()
    for name, content in vocabulary.tokenizer_files(dict(meta, **{"general.architecture": "llama"}),
                                                    "llama.gguf").items():
        (tmp_path / "llama" / name).write_bytes(content)
    assert load_tokenizer(str(tmp_path / "llama")).encode("<|user|>\nHi", bos=False) == [user] + sp.encode("\nHi")


def test_user_defined_tokens_are_matched_in_the_text_before_the_pieces(tmp_path):
    """Gemma's vocabulary holds runs of spaces and newlines as user-defined tokens with real spaces,
    which llama.cpp (and transformers) match in the text first: "a  b" is a, "  ", b."""
    import sentencepiece as spm

    from tokenizer import load_tokenizer

    meta, original = phi3_gguf_meta(tmp_path / "spm")
    runs = ["  ", "   ", "\n\n"]
    meta["general.architecture"], meta["tokenizer.ggml.add_space_prefix"] = "gemma3", False  # as Gemma's
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:-len(runs)] + runs  # in place of pads
    meta["tokenizer.ggml.token_type"][-len(runs):] = 4  # USER_DEFINED
    (tmp_path / "out").mkdir()
    for name, content in vocabulary.tokenizer_files(meta, "gemma3.gguf").items():
        (tmp_path / "out" / name).write_bytes(content)
    ours = load_tokenizer(str(tmp_path / "out"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))  # pieces alone
    two, three, lines = (PHI3_VOCAB - len(runs) + i for i in range(3))
    assert ours.encode("a   b  c\n\nd", bos=False) == (sp.encode("a") + [three] + sp.encode("b") + [two]
                                                      + sp.encode("c") + [lines] + sp.encode("d"))
    assert ours.decode(ours.encode("a   b  c", bos=False)) == "a   b  c"


def phi3_hugging_face_folder(folder):
    """A tiny Phi-3 as transformers writes it: the model, and a LlamaTokenizer over a SentencePiece
    model with Phi-3's added tokens (special; all but <|endoftext|> strip the whitespace after them),
    <|endoftext|> its EOS, <|endoftext|>, <|assistant|> and <|end|> ending generation."""
    import sentencepiece as spm
    from hf_checkpoints import make_hf_model
    from tokenizers import normalizers
    from transformers import AddedToken, LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    from checkpoints import make_tokenizer

    make_hf_model(folder, "phi3_gguf", vocab_size=PHI3_VOCAB)
    sp = spm.SentencePieceProcessor(model_file=make_tokenizer(folder))
    pieces = {sp.id_to_piece(i): i for i in range(len(sp))}
    merges = generate_merges(pieces, {piece: sp.get_score(i) for piece, i in pieces.items()})
    tokenizer = LlamaTokenizer(vocab=pieces, merges=merges, legacy=True, add_bos_token=False)
    # Phi-3's tokenizer.json: a "▁" before every stretch of text between added tokens, as SentencePiece
    # encodes each (transformers 5 writes a Metaspace instead, which adds none before a space)
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                                   normalizers.Replace(" ", "\u2581")])
    tokenizer.backend_tokenizer.pre_tokenizer = None
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, rstrip=t != "<|endoftext|>", normalized=False, special=True) for t in PHI3_ADDED]})
    tokenizer.save_pretrained(folder)
    ends = [len(sp) + PHI3_ADDED.index(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    for name, key, value in (("config.json", "eos_token_id", ends[0]), ("generation_config.json", "eos_token_id", ends)):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(dict(config, **{key: value})))
    return len(sp)


def test_a_phi3_folder_exports_its_added_tokens_to_gguf(tmp_path):
    """Phi-3's tokenizer.model holds no chat tokens: they come from tokenizer.json's added_tokens,
    at their ids (control, score -1000, as llama.cpp's converter writes them), EOS and EOT on
    <|endoftext|> and <|end|>; the GGUF read back encodes chats as transformers does."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    import convert
    import loading
    from formats import gguf as gguf_format
    from formats import mlx as mlx_format

    n_pieces = phi3_hugging_face_folder(tmp_path / "hf")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    checkpoint = mlx_format.Checkpoint(str(tmp_path / "mlx"))
    path = str(tmp_path / "phi3.gguf")
    gguf_format.write(checkpoint, path, gguf_format.tensor_types(checkpoint))
    fields = gguf.GGUFReader(path).fields
    tokens, types, scores = (fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "token_type", "scores"))
    added = slice(n_pieces, n_pieces + len(PHI3_ADDED))
    assert tokens[added] == PHI3_ADDED and types[added] == [3] * len(PHI3_ADDED)
    assert scores[added] == [-1000.0] * len(PHI3_ADDED)
    assert tokens[added.stop:] == [f"[PAD{i}]" for i in range(added.stop, PHI3_VOCAB)]
    assert set(types[added.stop:]) == {5} and len(tokens) == PHI3_VOCAB
    assert tokens[fields["tokenizer.ggml.eos_token_id"].contents()] == "<|endoftext|>"
    assert tokens[fields["tokenizer.ggml.eot_token_id"].contents()] == "<|end|>"
    convert.convert(path, str(tmp_path / "back"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for folder in ("mlx", "back"):
        ours = loading.load_model(str(tmp_path / folder))[1]
        for text in CHATS:
            assert ours.encode(text, bos=False) == theirs.encode(text, add_special_tokens=False), (folder, text)


@pytest.mark.parametrize("added, message", [
    ([(5, "<|user|>", True)], "added token 5 '<|user|>' is not its tokenizer.model's piece"),
    ([(PHI3_VOCAB, "<|user|>", True)], f"has id {PHI3_VOCAB}, past the model's {PHI3_VOCAB} rows"),
    ([(330, "<|user|>", True), (331, "<|user|>", True)], "holds a token twice")])
def test_added_tokens_that_do_not_fit_are_refused(tmp_path, added, message):
    from checkpoints import make_tokenizer
    from utils import UserError

    with pytest.raises(UserError, match=regex.escape(message)) as caught:
        vocabulary.sentencepiece_vocabulary(make_tokenizer(tmp_path), added, PHI3_VOCAB, "phi3")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("phi3: ")


@pytest.mark.parametrize("entry", [{"id": -1, "content": "<|x|>"}, {"id": 3}, {"id": "7", "content": "<|x|>"},
                                   "<|x|>"])
def test_an_added_token_that_is_not_an_id_and_a_text_is_refused(entry):
    from utils import UserError

    with pytest.raises(UserError, match="an added token is not an id and a text"):
        vocabulary.added_tokens({"added_tokens": [entry]}, "unused", "phi3")
