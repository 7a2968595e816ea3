"""Tokenizers: text to token ids and back, with the model's special tokens.

Three kinds, chosen from the files a model folder holds (load_tokenizer):
  tokenizer.json   Hugging Face's (the `tokenizers` library): byte-level BPE and others
  tokenizer.model  SentencePiece (LLaMA 1/2, Mistral), or Llama 3's tiktoken rank file

Every tokenizer offers encode(text, bos=True, eos=False), decode(ids), piece(id) (a
token's text as the vocabulary writes it: "<s>", "<|im_end|>"), bos_id,
eos_id (the first end token), eos_ids (every token that ends a turn or the text),
add_bos and vocab_size. Special tokens written in text (`<|im_start|>`, `<s>`)
encode to their ids. `bos=True` adds BOS only where the model uses one
(config.json's add_bos_token, else the tokenizer's own convention).
"""

import base64
import os
import re

from utils import UserError, read_json

# Llama 3's split of text into pieces before BPE (Meta's tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS = 256  # special tokens after the ranks, the rest reserved
MAX_TIKTOKEN_RANKS = 1 << 22


class Tokenizer:
    """What every kind shares: BOS, the end tokens, special tokens in text."""

    def _init_specials(self, bos_id, eos_ids, add_bos, config):
        """The tokenizer's own special ids, unless the model's config.json says otherwise."""
        self.bos_id = config.get("bos_token_id", bos_id)
        ends = config.get("eos_token_ids", eos_ids)
        self.eos_ids = frozenset(ends)
        self.eos_id = ends[0] if ends else None
        self.add_bos = config.get("add_bos_token", add_bos) and self.bos_id is not None
        for token in ({self.bos_id} - {None}) | self.eos_ids:
            if not 0 <= token < self.vocab_size:
                raise UserError(f"{self.path}: special token id {token} is outside its {self.vocab_size} tokens")

    def encode(self, text, bos=True, eos=False):
        start = [self.bos_id] if bos and self.add_bos else []
        end = [self.eos_id] if eos and self.eos_id is not None else []
        return start + self._encode(text) + end

    def decode(self, ids):
        """The text of `ids`."""
        # A model's vocabulary may be padded past its tokenizer's pieces (to a multiple of 64, say,
        # for speed): an id drawn from there has no text. It decodes as nothing, as Hugging Face's
        # tokenizers does, not as a U+FFFD marker, which streaming takes for half a character.
        return self._decode([i for i in ids if 0 <= i < self.vocab_size])


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece `tokenizer.model` with LLaMA's conventions (BOS/EOS ids from the model)."""

    def __init__(self, model_path, config=None):
        import sentencepiece as spm

        self.path = model_path
        if not os.path.exists(model_path):
            raise UserError(f"{model_path}: tokenizer not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except Exception as e:
            raise UserError(f"{model_path}: not a SentencePiece model ({e})")
        self.vocab_size = self._sp.vocab_size()
        # SentencePiece says -1 for a special token the model lacks: then there is none to add.
        bos, eos = (i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id()))
        self._init_specials(bos, [eos] if eos is not None else [], True, config or {})
        # Control pieces written in text (a chat template's "<s>") are those tokens, not their letters;
        # so are the added tokens, matched before the pieces merge (Gemma's runs of spaces).
        added, self._stripping = added_tokens(os.path.dirname(model_path), self.vocab_size)
        controls = {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}
        self._specials = {**added, **controls}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self._specials, key=len, reverse=True))) + ")") \
            if self._specials else None

    def _encode(self, text):
        if self._split is None:
            return self._sp.encode(text)
        ids, after = [], None
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._specials[part])
                after = part
            else:
                part = part.lstrip() if after in self._stripping else part
                ids += self._sp.encode(part) if part else []
        return ids

    def _decode(self, ids):
        return self._sp.decode(ids)

    def piece(self, token):
        return self._sp.id_to_piece(token)


class HFTokenizer(Tokenizer):
    """Hugging Face's tokenizer.json, through the `tokenizers` library."""

    def __init__(self, path, config=None):
        from tokenizers import Tokenizer as Backend

        self.path = path
        try:
            self._tok = Backend.from_file(path)
        except Exception as e:  # the library raises its own exception types for bad files
            raise UserError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._init_specials(None, [], False, config or {})

    def _encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self._tok.decode(ids, skip_special_tokens=False)

    def piece(self, token):
        return self._tok.id_to_token(token)


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tokenizer.model: base64 tokens and their ranks, with Meta's pattern and specials."""

    def __init__(self, path, config=None):
        import tiktoken

        self.path = path
        ranks = read_tiktoken_ranks(path)
        specials = llama3_special_tokens(path, len(ranks))
        self._enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = len(ranks) + len(specials)
        ends = [specials[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
        self._init_specials(specials["<|begin_of_text|>"], ends, True, config or {})

    def _encode(self, text):
        return self._enc.encode(text, allowed_special="all")

    def _decode(self, ids):
        return self._enc.decode(ids)

    def piece(self, token):
        return self._enc.decode_single_token_bytes(token).decode("utf-8", "replace")


def added_tokens(folder, vocab_size):
    """({text: id} of the added tokens, the texts of those that drop the whitespace after them):
    tokenizer_config.json's added_tokens_decoder (Gemma's runs of spaces; Phi-3's <|user|>, <|end|>,
    ... with rstrip)."""
    path = os.path.join(folder, "tokenizer_config.json")
    entries = read_added_tokens_decoder(path)
    if any(entry["id"] >= vocab_size for entry in entries):
        raise UserError(f"{path}: added_tokens_decoder holds an id past the tokenizer's {vocab_size} tokens")
    return ({entry["content"]: entry["id"] for entry in entries},
            frozenset(entry["content"] for entry in entries if entry.get("rstrip") is True))


def read_added_tokens_decoder(path):
    """The entries of tokenizer_config.json's added_tokens_decoder at `path` (none without the file),
    each with its "id"; one that is not an id and a text is refused in one line."""
    if not os.path.isfile(path):
        return []
    decoder = read_json(path, "tokenizer config").get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise UserError(f"{path}: added_tokens_decoder must map ids to tokens")
    entries = []
    for key, entry in decoder.items():
        if not (key.isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)
                and entry["content"]):
            raise UserError(f"{path}: added_tokens_decoder[{key[:20]!r}] is not an id and a text")
        entries.append(dict(entry, id=int(key)))
    return entries


def is_tiktoken_file(path):
    """A tiktoken rank file starts with "<base64 token> <rank>"; a SentencePiece model is protobuf."""
    with open(path, "rb") as f:
        first = f.readline(512)
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first) is not None


def read_tiktoken_ranks(path):
    """{token bytes: rank}, every line checked (a stranger's file, bounded by its size)."""
    if os.path.getsize(path) > 64 * MAX_TIKTOKEN_RANKS:
        raise UserError(f"{path}: too large for a tiktoken rank file")
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, IndexError):
                raise UserError(f"{path}: line {lineno}: not '<base64 token> <rank>'")
            if rank != len(ranks) or token in ranks:
                raise UserError(f"{path}: line {lineno}: rank {rank} out of order or token repeated")
            ranks[token] = rank
    if not ranks:
        raise UserError(f"{path}: no tokens")
    return ranks


def llama3_special_tokens(path, n_ranks=None):
    """Llama 3's 256 special tokens, numbered after the ranks: the named ones, then reserved."""
    n_ranks = n_ranks if n_ranks is not None else len(read_tiktoken_ranks(path))
    names = LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                     for i in range(2, LLAMA3_SPECIALS - len(LLAMA3_NAMED_SPECIALS) + 2)]
    return {name: n_ranks + i for i, name in enumerate(names)}


def load_tokenizer(folder, config=None):
    """The tokenizer of a model folder, its special tokens as config.json says."""
    hf = os.path.join(folder, "tokenizer.json")
    if os.path.exists(hf):
        return HFTokenizer(hf, config)
    model = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(model) and is_tiktoken_file(model):
        return TiktokenTokenizer(model, config)
    return SentencePieceTokenizer(model, config)
