"""Tokenizers both ways: GGUF's vocabulary as tokenizer.json (byte-level BPE, split as llama.cpp
splits by tokenizer.ggml.pre) or a SentencePiece model; a model folder's tokenizer as GGUF's.
"""

import json
import os
import struct
import tempfile
from collections import namedtuple
from functools import cache, lru_cache

import numpy as np

from tokenizer import read_added_tokens_decoder
from utils import UserError, read_json

from formats.gguf.header import brief, is_int, shown
from formats.protobuf import proto_field, proto_fields


# Byte-level BPE: how llama.cpp splits text before the merges (src/llama-vocab.cpp), by
# tokenizer.ggml.pre; its regexes run one after another, each on the pieces of the last. Written
# for Oniguruma (the `tokenizers` library's engine); (?i:...) spelled out, as llama.cpp does.
def either(*alternatives):
    return "|".join(alternatives)


def code_points(ranges):
    """A character class of code points listed in hex ("41-5A B5 ..."), for classes that name no
    Unicode property."""
    return "[" + "".join("-".join(chr(int(end, 16)) for end in span.split("-")) for span in ranges.split()) + "]"


CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
WORD = r"[^\r\n\p{L}\p{N}]?\p{L}+"  # letters, with the one character before them that is neither
SYMBOLS = r" ?[^\s\p{L}\p{N}]+[\r\n]*"
SPACES = (r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+")  # line breaks (and the spaces before), then runs of spaces
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = either(CONTRACTION, WORD, r"\p{N}{1,3}", SYMBOLS, *SPACES)
QWEN2_SPLIT = either(CONTRACTION, WORD, r"\p{N}", SYMBOLS, *SPACES)
SEED_CODER_SPLIT = either(CONTRACTION, WORD, r"\p{N}", r" ?[^\s\p{L}\p{N}\r\n]+", *SPACES)
# Mistral's tekken and GPT-4o: words cut where lower case turns upper. llama.cpp's engine has no
# \p{Lu} or \p{Ll}: an upper-case letter is a letter outside a-z, a lower-case one outside A-Z.
UPPER, LOWER = r"(?:(?=\p{L})[^a-z])", r"(?:(?=\p{L})[^A-Z])"
CASED_WORDS = (rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+", rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*")
SLASHED_SYMBOLS = r" ?[^\s\p{L}\p{N}]+[\r\n/]*"
TEKKEN_SPLIT = either(*CASED_WORDS, r"\p{N}", SLASHED_SYMBOLS, *SPACES)
GPT4O_SPLIT = either(*(word + CONTRACTION + "?" for word in CASED_WORDS), r"\p{N}{1,3}", SLASHED_SYMBOLS, *SPACES)
# DeepSeek's: line breaks alone, then words (a space before them), punctuation, trailing spaces,
# Chinese (LLM and Coder: with everything from U+0800 and Hangul) and numbers, each a split of its own
DEEPSEEK_LETTERS = code_points(  # the cased letters (Latin, Greek, Cyrillic, ...) DeepSeek LLM lists
    "41-5A 61-7A B5 C0-D6 D8-F6 F8-1BA 1BC-1BF 1C4-293 295-2AF 370-373 376 377 37B-37D 37F 386 388-38A 38C "
    "38E-3A1 3A3-3F5 3F7-481 48A-52F 531-556 10A0-10C5 13A0-13F5 13F8-13FD 1C90-1CBA 1CBD-1CBF 1D00-1D2B "
    "1D6B-1D77 1D79-1D9A 1E00-1F15 1F18-1F1D 1F20-1F45 1F48-1F4D 1F50-1F57 1F59 1F5B 1F5D 1F5F-1F7D 1F80-1FB4 "
    "1FB6-1FBC 1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3 1FD6-1FDB 1FE0-1FEC 1FF2-1FF4 1FF6-1FFC 2102 2107 210A-2113 "
    "2115 2119-211D 2124 2126 2128 212A-212D 212F-2134 2139 213C-213F 2145-2149 214E 2183 2184 2C00-2C7B "
    "2C7E-2CE4 2CEB-2CEE 2CF2 2CF3 A640-A66D A680-A69B A722-A76F A771-A787 A78B-A78E AB70-ABBF FB00-FB06 "
    "FB13-FB17 FF21-FF3A FF41-FF5A 10400-1044F 104B0-104D3 104D8-104FB 10C80-10CB2 10CC0-10CF2 118A0-118DF "
    "1E900-1E943")
DEEPSEEK_CJK = code_points("4E00-9FA5 800-4E00 AC00-D7FF") + "+"
DEEPSEEK_LLM_SPLITS = (r"[\r\n]", r"\s?" + DEEPSEEK_LETTERS + "+",
                       r"\s?" + code_points("21-2F 3A-7E FF01-FF0F FF1A-FF5E 2018-201F 3000-3002") + "+",
                       r"\s+$", DEEPSEEK_CJK, r"\p{N}+")  # $: a piece's end (no line break is left in one)
DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}")
# DeepSeek V3: numbers in threes, Chinese and kana, then words led by one ASCII punctuation mark
DEEPSEEK_V3_SPLITS = (r"\p{N}{1,3}", code_points("4E00-9FA5 3040-309F 30A0-30FF") + "+",
                      either(r"[!-/:-@\[-`{-~][A-Za-z]+", r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+",
                             r" ?[\p{P}\p{S}]+[\r\n]*", *SPACES))
# BLOOM's: anything but spaces and sentence punctuation (Latin, CJK, Devanagari, Arabic), a space before
BLOOM_SPLIT = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
               "jina-v5-nano")
# where llama.cpp looks a whole piece up before merging it (BPE's ignore_merges) and adds BOS
WHOLE_PIECE_PRES = LLAMA3_PRES + ("tekken",)
PRE_SPLITS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"),
    **dict.fromkeys(LLAMA3_PRES + ("dbrx", "smaug-bpe"), (LLAMA3_SPLIT,)),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "a.x-4.0", "mellum",
                     "gigachat", "granite-docling"), (GPT2_SPLIT,)),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    (r"\p{N}", GPT2_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "solar-open", "grok-2"), (QWEN2_SPLIT,)),
    "seed-coder": (SEED_CODER_SPLIT,),
    "tekken": (TEKKEN_SPLIT,),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), (GPT4O_SPLIT,)),
    "deepseek-llm": DEEPSEEK_LLM_SPLITS,
    "deepseek-coder": DEEPSEEK_CODER_SPLITS,
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), DEEPSEEK_V3_SPLITS),
    **dict.fromkeys(("bloom", "poro-chat", "gpt3-finnish"), (BLOOM_SPLIT,)),
    "viking": (BLOOM_SPLIT, r"\p{N}"),
}
# GGUF token types, the same numbers as SentencePiece's piece types.
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)


def tokenizer_files(meta, path):
    """{file name: bytes} of the tokenizer the file describes, built and checked now."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta["tokenizer.ggml.tokens"]  # checked by vocab_size
    types = token_types(meta, len(tokens), path)
    for i, token in enumerate(tokens):
        if not token:
            raise UserError(f"{path}: tokenizer.ggml.tokens[{i}] is empty")
    if len(set(tokens)) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.tokens holds a token twice")
    if model == "gpt2":
        files = {"tokenizer.json": byte_level_bpe(meta, tokens, types, path)}
    elif model == "llama":
        files = {"tokenizer.model": sentencepiece_model(meta, tokens, types, path)}
        decoder = added_tokens_decoder(tokens, types, meta.get("general.architecture"))
        if decoder:
            files["tokenizer_config.json"] = json.dumps({"added_tokens_decoder": decoder}, indent=2).encode("utf-8")
    else:
        raise UserError(f"{path}: tokenizer model {brief(model)} is not supported (supported: gpt2, llama)")
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise UserError(f"{path}: tokenizer.chat_template must be text, got {brief(template)}")
        files["chat_template.jinja"] = template.encode("utf-8")
    return files


PHI3_KEPT_SPACES = ("<unk>", "<s>", "<|endoftext|>")  # Phi-3's special tokens that keep the whitespace after them


def added_tokens_decoder(tokens, types, arch):
    """tokenizer_config.json's added_tokens_decoder for a SentencePiece vocabulary: the tokens
    llama.cpp matches in the text before the pieces are merged, as Hugging Face's added tokens are.
    The user-defined ones (Gemma's runs of spaces and newlines) are not special; with Phi-3's, the
    special tokens drop the whitespace after them (rstrip) but <unk>, <s> and <|endoftext|>, as
    Phi-3's tokenizer.json has it and llama.cpp assumes for a Phi-3 (<|user|>\nHi is <|user|> Hi)."""
    decoder = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        rstrip = arch == "phi3" and kind in (CONTROL, USER_DEFINED, UNKNOWN) and token not in PHI3_KEPT_SPACES
        if kind == USER_DEFINED or rstrip:
            decoder[str(i)] = {"content": token, "special": bool(kind != USER_DEFINED), "rstrip": rstrip}
    return decoder


def token_types(meta, n_tokens, path):
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return np.full(n_tokens, NORMAL)
    if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or len(types) != n_tokens:
        raise UserError(f"{path}: tokenizer.ggml.token_type must be {n_tokens} integers, one a token")
    if np.any((types < UNDEFINED) | (types > BYTE)):
        raise UserError(f"{path}: tokenizer.ggml.token_type holds a type outside 0 to {BYTE}")
    return np.where(types == UNDEFINED, NORMAL, types)


def byte_level_bpe(meta, tokens, types, path):
    """tokenizer.json of a byte-level BPE vocabulary (GPT-2's alphabet, as GGUF stores it), split
    as llama.cpp splits for tokenizer.ggml.pre; control tokens special, user-defined ones added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp's choice when the file names none
    if pre not in PRE_SPLITS:
        raise UserError(f"{path}: tokenizer.ggml.pre {brief(pre)} is not supported (supported: "
                        f"{', '.join(sorted(PRE_SPLITS))})")
    ids = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=ids, merges=merge_pairs(meta, ids, path), ignore_merges=pre in WHOLE_PIECE_PRES)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = split_by(PRE_SPLITS[pre])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    return tokenizer.to_str().encode("utf-8")


def split_by(regexes):
    """The pre-tokenizer that splits by `regexes` in turn, each match a piece of its own, then
    spells the pieces' bytes in GPT-2's alphabet."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def merge_pairs(meta, ids, path):
    """tokenizer.ggml.merges as (left, right) pairs, split at the first space after the first
    character (llama.cpp's rule); both halves and their join must be tokens."""
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise UserError(f"{path}: a gpt2 vocabulary needs tokenizer.ggml.merges, a list of strings")
    pairs = []
    for i, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        left, right = merge[:max(cut, 0)], merge[cut + 1:]
        if cut < 0 or left not in ids or right not in ids or left + right not in ids:
            raise UserError(f"{path}: tokenizer.ggml.merges[{i}] {brief(merge)} is not two tokens that "
                            "merge into a token")
        pairs.append((left, right))
    return pairs


def sentencepiece_model(meta, tokens, types, path):
    """tokenizer.model of a SentencePiece (llama) vocabulary: a BPE ModelProto with the pieces,
    scores and types, and LLaMA's normalizer; loaded once here to check it."""
    import sentencepiece as spm

    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, np.ndarray) or scores.dtype.kind != "f" or len(scores) != len(tokens):
        raise UserError(f"{path}: a llama vocabulary needs tokenizer.ggml.scores, {len(tokens)} numbers")
    if not np.all(np.isfinite(scores)):
        raise UserError(f"{path}: tokenizer.ggml.scores holds NaN or infinity")
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    if not np.any(types == UNKNOWN) and is_int(unknown) and 0 <= unknown < len(tokens):
        types = np.where(np.arange(len(tokens)) == unknown, UNKNOWN, types)
    pieces = b"".join(proto_field(1, proto_field(1, t) + proto_field(2, float(s)) + proto_field(3, int(k)))
                      for t, s, k in zip(tokens, scores, types))
    trainer = proto_field(3, 2) + proto_field(4, len(tokens))  # model_type BPE, vocab_size
    trainer += proto_field(26, True)  # runs of spaces stay whole, as llama.cpp merges them
    trainer += proto_field(35, bool(np.any(types == BYTE)))  # byte_fallback: <0xNN> pieces for the rest
    specials = {"unknown_token_id": (40, 45), "bos_token_id": (41, 46), "eos_token_id": (42, 47),
                "padding_token_id": (43, 48)}
    for key, (id_field, piece_field) in specials.items():
        token = meta.get(f"tokenizer.ggml.{key}")
        if is_int(token) and 0 <= token < len(tokens):
            trainer += proto_field(id_field, token) + proto_field(piece_field, tokens[token])
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(add_prefix, bool):
        raise UserError(f"{path}: tokenizer.ggml.add_space_prefix must be true or false, got {brief(add_prefix)}")
    # LLaMA's normalizer: no NFKC, a space before the text, spaces as U+2581, runs of them kept
    normalizer = (proto_field(1, "identity") + proto_field(3, add_prefix) + proto_field(4, False)
                  + proto_field(5, True))
    model = pieces + proto_field(2, trainer) + proto_field(3, normalizer)
    try:
        spm.SentencePieceProcessor().LoadFromSerializedProto(model)
    except RuntimeError as e:  # sentencepiece's report of a bad model
        detail = shown(str(e).strip() or type(e).__name__, 200)
        raise UserError(f"{path}: its llama vocabulary is not a valid SentencePiece model ({detail})")
    return model


# Text that every pre-tokenizer of PRE_SPLITS splits its own way (checked in tests): runs of
# digits, spaces and line breaks, contractions in both cases, case changes, punctuation, scripts.
# No combining marks and no words in capitals outside A-Z: there llama.cpp's tekken and gpt-4o
# regexes part from Hugging Face's.
PRE_PROBE = ("\n \n\n \t\t x  \n   y\r\n 3 33 333 4444 55555 3.14 1,000,000 ١٢٣ \u00bd I'm here, 'RE you?\n"
             "We'Ve a'lL DON'T iPhone McDonald's HTTPServer fooBar Straße \u0391\u03b8\u03ae\u03bd\u03b1 "
             "Привет мир! 你好世界 こんにちは カタカナ 한국어 नमन। السلام، ٹیسٹ۔ ...!!!??? -----===== "
             "<|im_start|> a/b//c\n/path/to ~$+<=>^|` \"quoted\" (brackets) [x] {y} @home #tag 🚀😀 \u2026 "
             "\u3002\uff0c\u3001 \uff01\uff1f\u300c\u300d \u2018single\u2019 \u3000ideographic "
             "trailing   ")
# Names first chosen for a folder's tokenizer.json; any other name that splits the same way after them.
PREFERRED_PRES = ("default", "llama-bpe", "smaug-bpe", "gpt-2", "smollm", "qwen2")
PAD_SCORE = -1000.0  # llama.cpp's score for added tokens and the [PADn] tokens filling a vocabulary to the model's rows
EOM_TOKEN = "<|eom_id|>"   # Llama 3.1's end of a message that awaits a tool's answer
# ends of a turn by their text (llama.cpp guesses its eot so): Phi-3's generation_config.json lists
# <|assistant|> among its ends before <|end|>
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
SPM_BPE = 2          # SentencePiece's TrainerSpec.model_type for BPE (1, the default, is unigram)

Vocabulary = namedtuple("Vocabulary", "model pre tokens types merges scores add_space_prefix")


def exported_vocabulary(checkpoint):
    """(Vocabulary, special tokens, chat template or None) of the checkpoint's tokenizer: its files as
    the checkpoint writes them into a model folder, its special tokens as this toolkit reads them."""
    import chat
    from tokenizer import is_tiktoken_file, load_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        checkpoint.write_tokenizer(folder)  # every format's tokenizer files, as a model folder holds them
        config = checkpoint.config
        n_vocab = config["vocab_size"]
        json_path, model_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
        data = read_json(json_path, "tokenizer") if os.path.isfile(json_path) else None
        if data is not None and is_byte_level(data):
            vocab = byte_level_vocabulary(data, n_vocab, checkpoint.path)
        elif os.path.isfile(model_path) and is_tiktoken_file(model_path):
            vocab = tiktoken_vocabulary(model_path, n_vocab, checkpoint.path)
        elif os.path.isfile(model_path):
            added = added_tokens(data, os.path.join(folder, "tokenizer_config.json"), checkpoint.path)
            vocab = sentencepiece_vocabulary(model_path, added, n_vocab, checkpoint.path)
        elif data is not None:
            raise UserError(f"{checkpoint.path}: its tokenizer.json is not a byte-level BPE, and there is no "
                            "tokenizer.model: llama.cpp holds neither")
        else:
            raise UserError(f"{checkpoint.path}: no tokenizer (tokenizer.json or tokenizer.model) to write into "
                            "the GGUF file")
        settings = {key: config[key] for key in ("bos_token_id", "eos_token_ids", "add_bos_token") if key in config}
        # this toolkit's tokenizer of the folder: the special tokens exactly as it encodes with them
        ours = load_tokenizer(folder, settings)
        ends = list(settings.get("eos_token_ids") or ([ours.eos_id] if ours.eos_id is not None else []))
        ends += sorted(ours.eos_ids - set(ends))
        specials = {"bos": ours.bos_id, "ends": ends, "add_bos": bool(ours.add_bos)}
        return vocab, specials, chat.load_template(folder)


def add_vocabulary(writer, exported):
    """tokenizer.ggml.*: the vocabulary, BOS, the end tokens (end of text, of turn, of message),
    whether BOS is added, and the chat template."""
    vocab, specials, template = exported
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
        if UNKNOWN in vocab.types:
            writer.add_unk_token_id(vocab.types.index(UNKNOWN))
    if specials["bos"] is not None:
        writer.add_bos_token_id(specials["bos"])
    if specials["ends"]:
        writer.add_eos_token_id(specials["ends"][0])
    # llama.cpp has one more end of a turn (eot) and of a message (eom, Llama 3.1's tool calls)
    rest = specials["ends"][1:]
    eom = next((token for token in rest if vocab.tokens[token] == EOM_TOKEN), None)
    turns = [token for token in rest if token != eom]
    eot = next((token for token in turns if vocab.tokens[token] in END_OF_TURN), turns[0] if turns else None)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if eom is not None:
        writer.add_eom_token_id(eom)
    writer.add_add_bos_token(specials["add_bos"])
    if template is not None:
        writer.add_chat_template(template)


def padded(tokens, types, n_vocab, where):
    """The vocabulary filled up to the model's rows with [PADn] tokens (unused), as llama.cpp's
    converter fills it; ids past the model's rows are refused."""
    if len(tokens) > n_vocab:
        raise UserError(f"{where}: the tokenizer has {len(tokens)} tokens, the model only {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(None)
        types.append(UNUSED)
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    if len(set(tokens)) != len(tokens):
        raise UserError(f"{where}: the tokenizer holds a token twice")
    return tokens, types


def is_byte_level(data):
    """Whether a tokenizer.json is a byte-level BPE: a BPE model with a ByteLevel pre-tokenizer or decoder."""
    def kinds(part):
        if not isinstance(part, dict):
            return []
        inner = part.get("pretokenizers") or part.get("decoders") or []
        return [part.get("type")] + [k for p in inner for k in kinds(p)]

    model = data.get("model") if isinstance(data, dict) else None
    return (isinstance(model, dict) and model.get("type") == "BPE"
            and "ByteLevel" in kinds(data.get("pre_tokenizer")) + kinds(data.get("decoder")))


def pre_tokenizer_name(pre, ignore_merges):
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json's pre-tokenizer: the name whose regexes
    split PRE_PROBE into the same pieces (however the file spells them: llama.cpp's converter too
    tells them apart by their output), merging as the file does where names differ only in that;
    None when the pre-tokenizer is not Splits (or Digits) then a ByteLevel, or splits otherwise."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not steps or not all(isinstance(step, dict) for step in steps):
        return None
    *splits, last = steps
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space") or \
            not all(step.get("type") in ("Split", "Digits") for step in splits):
        return None
    from tokenizers import Tokenizer

    try:  # the library reads a pre-tokenizer only as part of a whole tokenizer
        tokenizer = Tokenizer.from_str(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []},
                                                   "pre_tokenizer": pre}))
    except Exception:  # the library's own exception types (a bad regex, a field missing): no name
        return None
    pieces = tuple(piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(PRE_PROBE))
    names = [name for name in PREFERRED_PRES + tuple(PRE_SPLITS) if probe_pieces(PRE_SPLITS[name]) == pieces]
    merging_alike = [name for name in names if (name in WHOLE_PIECE_PRES) == bool(ignore_merges)]
    return (merging_alike or names or [None])[0]


@cache
def probe_pieces(splits):
    """The pieces PRE_PROBE splits into by `splits`, regexes in turn."""
    return tuple(piece for piece, _ in split_by(splits).pre_tokenize_str(PRE_PROBE))


def byte_level_vocabulary(data, n_vocab, where):
    """gpt2: tokens in id order (the added ones at their ids: special ones control, others user-
    defined), merges as "a b", and the pre-tokenizer's name."""
    model = data["model"]
    pre = pre_tokenizer_name(data.get("pre_tokenizer"), model.get("ignore_merges", False))
    if pre is None:
        raise UserError(f"{where}: cannot name this tokenizer's pre-tokenizer for llama.cpp "
                        f"({brief(json.dumps(data.get('pre_tokenizer')), 120)})")
    if data.get("normalizer") is not None:
        raise UserError(f"{where}: its tokenizer.json has a normalizer ({brief(data['normalizer'].get('type'))}), "
                        "which llama.cpp's byte-level BPE does not apply")
    ids = dict(model.get("vocab") or {})
    ids.update({added["content"]: added["id"] for added in data.get("added_tokens", [])})
    tokens, types = [None] * (max(ids.values(), default=-1) + 1), [NORMAL] * (max(ids.values(), default=-1) + 1)
    for token, i in ids.items():
        tokens[i] = token
    for added in data.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    tokens, types = padded(tokens, types, n_vocab, where)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocabulary("gpt2", pre, tokens, types, merges, None, None)


def tiktoken_vocabulary(path, n_vocab, where):
    """Llama 3's tiktoken ranks as the byte-level BPE llama.cpp reads: each token's bytes spelled
    in GPT-2's alphabet, the merges its ranks imply, the 256 specials as control tokens."""
    from tokenizer import llama3_special_tokens, read_tiktoken_ranks

    ranks = read_tiktoken_ranks(path)
    spelling = byte_spelling()
    tokens = ["".join(spelling[b] for b in token) for token in ranks]  # in rank order: the ids
    types = [NORMAL] * len(tokens)
    for name, i in llama3_special_tokens(path, len(ranks)).items():
        tokens.append(name)
        types.append(CONTROL)
    tokens, types = padded(tokens, types, n_vocab, where)
    return Vocabulary("gpt2", "llama-bpe", tokens, types, tiktoken_merges(ranks, tokens), None, None)


def tiktoken_merges(ranks, tokens):
    """The merges a rank table implies, as Hugging Face's converter makes them: every split of a
    token into two tokens, by the rank of the token they make, then of its halves."""
    merges = []
    for token, rank in ranks.items():
        halves = [(ranks[token[:i]], ranks[token[i:]]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [f"{tokens[left]} {tokens[right]}" for left, right in sorted(halves)]
    return merges


@lru_cache(maxsize=1)
def byte_spelling():
    """GPT-2's alphabet: each byte as a printable character (printable Latin-1 as itself, the
    others as the characters from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    spelled = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [spelled[b] for b in range(256)]


def added_tokens(data, config_path, where):
    """[(id, text, special)] of the tokens a folder adds to its tokenizer.model's pieces (Phi-3's
    chat tokens): tokenizer.json's added_tokens, else tokenizer_config.json's added_tokens_decoder."""
    entries = (data.get("added_tokens") or []) if data is not None else read_added_tokens_decoder(config_path)
    added = []
    for entry in entries:
        if not (isinstance(entry, dict) and is_int(entry.get("id")) and entry["id"] >= 0
                and isinstance(entry.get("content"), str) and entry["content"]):
            raise UserError(f"{where}: an added token is not an id and a text: {brief(json.dumps(entry), 120)}")
        added.append((entry["id"], entry["content"], bool(entry.get("special"))))
    return added


def sentencepiece_vocabulary(path, added, n_vocab, where):
    """llama: SentencePiece's pieces, scores and types (the same numbers as GGUF's), read off the
    model's protobuf, add_space_prefix from its normalizer, and the folder's `added` tokens at their
    ids (special ones control, others user-defined, as llama.cpp's converter types them)."""
    import sentencepiece as spm

    with open(path, "rb") as f:
        raw = f.read()
    try:
        spm.SentencePieceProcessor().LoadFromSerializedProto(raw)  # checks the whole model once
    except RuntimeError as e:
        raise UserError(f"{where}: its tokenizer.model is not a SentencePiece model ({shown(str(e), 200)})")
    tokens, scores, types, trainer, normalizer = [], [], [], {}, {}
    for number, value in proto_fields(raw):
        if number == 1:  # a piece: its text, score and type
            piece = dict(proto_fields(value))
            tokens.append(piece.get(1, b"").decode("utf-8"))
            scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
            types.append(piece.get(3, NORMAL))
        elif number in (2, 3):
            (trainer if number == 2 else normalizer).update(proto_fields(value))
    if trainer.get(3, 1) != SPM_BPE:
        raise UserError(f"{where}: its tokenizer.model is a SentencePiece unigram model; llama.cpp's llama "
                        "vocabulary merges pieces as BPE does")
    n_pieces = len(tokens)
    for token, text, special in added:
        if token < n_pieces:  # the model's own <s>, </s>, listed again
            if tokens[token] != text:
                raise UserError(f"{where}: added token {token} {brief(text)} is not its tokenizer.model's piece "
                                f"{brief(tokens[token])}")
            continue
        if token >= n_vocab:
            raise UserError(f"{where}: added token {brief(text)} has id {token}, past the model's {n_vocab} rows")
        missing = token + 1 - len(tokens)
        tokens, types, scores = tokens + [None] * missing, types + [None] * missing, scores + [None] * missing
        tokens[token], types[token], scores[token] = text, CONTROL if special else USER_DEFINED, PAD_SCORE
    tokens, types = padded(tokens, types, n_vocab, where)
    scores = [PAD_SCORE if s is None else s for s in scores] + [PAD_SCORE] * (len(tokens) - len(scores))
    return Vocabulary("llama", None, tokens, types, None, scores, bool(normalizer.get(3, True)))
