"""Tokenizers found in a checkpoint directory: HF `tokenizer.json` or sentencepiece."""

from __future__ import annotations

import os
from collections.abc import Sequence

from meshserve.models.config import ModelConfig


class Tokenizer:
    """encode/decode over either backend; BOS/EOS come from the model config."""

    def __init__(self, path: str, config: ModelConfig):
        self.path = path
        self.bos_id = config.bos_token_id
        self.eos_ids = tuple(config.eos_token_ids)
        if path.endswith(".json"):
            import tokenizers

            self._hf = tokenizers.Tokenizer.from_file(path)
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        else:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = list(self._sp.encode(text))
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            special = set(self.eos_ids) | ({self.bos_id} if self.bos_id is not None else set())
            ids = [i for i in ids if i not in special]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        return self._sp.decode(ids)


def find_tokenizer(model_dir: str, config: ModelConfig) -> Tokenizer | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            return Tokenizer(path, config)
    return None
