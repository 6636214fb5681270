"""Incremental detokenization: UTF-8 safety and stop strings that never leak."""

from __future__ import annotations

import pytest

from meshserve.engine.detokenizer import IncrementalDetokenizer
from meshserve.models.config import ModelConfig
from meshserve.models.demo import train_demo_tokenizer
from meshserve.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_demo_tokenizer())
    cfg = ModelConfig(family="llama", vocab_size=512, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, bos_token_id=1,
                      eos_token_ids=(2,))
    return Tokenizer(str(path), cfg)


def _stream(tokenizer, text: str, stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [1], stop)
    pieces = []
    for t in ids:
        detok.add(t)
        pieces.append(detok.take())
        if detok.stopped:
            break
    pieces.append(detok.take(final=True))
    return pieces, detok


def test_multibyte_characters_are_never_split(tokenizer):
    text = "Zürich 😀 naïve façade, São Paulo"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # byte fallback: the emoji is several tokens
    pieces, _ = _stream(tokenizer, text)
    assert "".join(pieces) == text
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # every chunk is valid UTF-8 on its own


def test_stop_string_is_cut_and_its_prefix_held_back(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    pieces, detok = _stream(tokenizer, text, stop=("fox jumps",))
    assert detok.stopped
    assert "".join(pieces) == "The quick brown "
    # before the stop completed, nothing of "fox" went out early
    assert all("fox" not in p for p in pieces)


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer):
    pieces, detok = _stream(tokenizer, "one two three four", stop=("two three five",))
    assert not detok.stopped
    assert "".join(pieces) == "one two three four"


def test_leading_space_survives_incremental_decoding(tokenizer):
    pieces, _ = _stream(tokenizer, " Hello mesh")
    ids = tokenizer.encode(" Hello mesh", add_special_tokens=False)
    assert "".join(pieces) == tokenizer.decode(ids)
