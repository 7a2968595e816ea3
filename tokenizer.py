"""Tokenizers: text to token ids and back, with the model's special tokens.

Every tokenizer here offers encode(text, bos, eos), decode(ids), bos_id,
eos_id and vocab_size. A model folder's tokenizer is chosen from the files it
holds (load_tokenizer).
"""

import os

from utils import UserError


class SentencePieceTokenizer:
    """SentencePiece `tokenizer.model` with LLaMA's conventions (BOS/EOS ids from the model)."""

    def __init__(self, model_path):
        import sentencepiece as spm

        if not os.path.exists(model_path):
            raise UserError(f"{model_path}: tokenizer not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except Exception as e:
            raise UserError(f"{model_path}: not a SentencePiece model ({e})")
        # SentencePiece says -1 for a special token the model lacks: then there is none to add.
        self.bos_id, self.eos_id = (i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id()))
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text, bos=True, eos=False):
        start = [self.bos_id] if bos and self.bos_id is not None else []
        end = [self.eos_id] if eos and self.eos_id is not None else []
        return start + self._sp.encode(text) + end

    def decode(self, ids):
        return self._sp.decode(list(ids))


def load_tokenizer(folder):
    """The tokenizer of a model folder."""
    return SentencePieceTokenizer(os.path.join(folder, "tokenizer.model"))
