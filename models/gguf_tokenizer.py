"""Hugging Face tokenizer files built from a GGUF file's tokenizer metadata.

A GGUF carries its vocabulary as metadata in llama.cpp's terms: `tokenizer.ggml.model`
"gpt2" (byte-level BPE: tokens and merges) or "llama" (sentencepiece-style BPE: tokens
and scores, byte fallback). We rebuild that tokenizer with the `tokenizers` library and
write it the way a Hugging Face model directory has it: `tokenizer.json`,
`tokenizer_config.json` (special tokens, add_bos_token, chat_template) and
`generation_config.json` (BOS/EOS ids), so a converted GGUF checkpoint reads like a
converted HF one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from meshserve.models.hf_weights import ConversionError

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4

# How text is split before BPE, by `tokenizer.ggml.pre`: the patterns the vocabularies
# were trained with. Types not listed split as GPT-2 does (ByteLevel's own pattern).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS: Mapping[str, str] = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
GPT2_SPLIT_TYPES = frozenset({"default", "gpt-2", "gpt2", "smollm"})


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → character map: printable Latin-1 bytes stand for
    themselves, the others for the code points from 256 up, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two
    pieces is a merge, ranked by the merged piece's score (best first), then by longer
    left and right parts, then by the parts' ids."""
    candidates = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                  if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        candidates += [(score, left, right) for left, right in splits]
    # Python's sort is stable, so ties keep the (score order, id order) they came in.
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=True)
    return [(left, right) for _, left, right in candidates]


def _byte_level_model(meta: Mapping[str, Any], tokens: Sequence[str]):
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for i, token in enumerate(tokens):
        if not set(token) <= spelled:  # stored as text, not in the byte alphabet
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, {t: -i for t, i in vocab.items()})
    bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                     end_of_word_suffix="", fuse_unk=False)
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre in SPLIT_PATTERNS:
        from tokenizers import Regex

        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERNS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        if pre not in GPT2_SPLIT_TYPES:
            log.warning("GGUF pre-tokenizer %r is not known here: splitting text as GPT-2 "
                        "does, which may tokenize some text differently", pre)
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return bpe, pre_tokenizer, decoders.ByteLevel(), spelled


def _sentencepiece_model(meta: Mapping[str, Any], tokens: Sequence[str]):
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ConversionError("the GGUF's sentencepiece vocabulary has neither merges "
                                  "nor one score per token")
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                     unk_token=None if unk is None else tokens[int(unk)])
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return bpe, pre_tokenizer, decoders.Sequence(steps), None


def _special_ids(meta: Mapping[str, Any]) -> dict[str, int]:
    names = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown",
             "pad_token": "padding"}
    return {name: int(meta[f"tokenizer.ggml.{key}_token_id"]) for name, key in names.items()
            if f"tokenizer.ggml.{key}_token_id" in meta}


def add_bos_default(meta: Mapping[str, Any]) -> bool:
    """Whether encoding starts with BOS: the file's flag, else llama.cpp's default
    (yes for sentencepiece vocabularies, no for byte-level ones)."""
    if "tokenizer.ggml.add_bos_token" in meta:
        return bool(meta["tokenizer.ggml.add_bos_token"])
    return meta.get("tokenizer.ggml.model") == "llama"


def build_tokenizer(meta: Mapping[str, Any]):
    """The file's tokenizer as a `tokenizers.Tokenizer`, or None if it has none."""
    from tokenizers import AddedToken, Tokenizer, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        return None
    if kind not in ("gpt2", "llama"):
        raise ConversionError(f"GGUF tokenizer model {kind!r} is not supported "
                              "(supported: gpt2, llama)")
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    ids = _special_ids(meta)
    if len(types) != len(tokens):
        raise ConversionError(f"the GGUF has {len(tokens)} tokens but {len(types)} token types")
    out_of_range = {k: i for k, i in ids.items() if not 0 <= i < len(tokens)}
    if out_of_range:
        raise ConversionError(f"the GGUF's special token ids {out_of_range} are outside its "
                              f"vocabulary of {len(tokens)}")
    build = _byte_level_model if kind == "gpt2" else _sentencepiece_model
    try:
        model, pre_tokenizer, decoder, spelled = build(meta, tokens)
    except ConversionError:
        raise
    except Exception as e:  # `tokenizers` rejects malformed vocabularies and merges so
        raise ConversionError(f"the GGUF's tokenizer cannot be built: {e}") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    # Control tokens (and the named special ones) stay whole in text and are skipped when
    # decoding; user-defined ones stay whole but decode as text. A byte-level "control"
    # token outside the byte alphabet is a mislabel in some files: left alone.
    special = {i for i, t in enumerate(types) if t == CONTROL
               and (spelled is None or set(tokens[i]) <= spelled)}
    special |= set(_special_ids(meta).values())
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in sorted(special)])
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == USER_DEFINED and i not in special]
    if user:
        tok.add_tokens(user)
    bos = tokens[ids["bos_token"]] if add_bos_default(meta) and "bos_token" in ids else None
    eos = (tokens[ids["eos_token"]] if meta.get("tokenizer.ggml.add_eos_token")
           and "eos_token" in ids else None)

    def around(sequence: str, type_id: int) -> list[str]:
        return [*([f"{bos}:{type_id}"] if bos else []), f"{sequence}:{type_id}",
                *([f"{eos}:{type_id}"] if eos else [])]

    tok.post_processor = processors.TemplateProcessing(
        single=around("$A", 0), pair=around("$A", 0) + around("$B", 1),
        special_tokens=[(t, ids[k]) for t, k in ((bos, "bos_token"), (eos, "eos_token")) if t])
    return tok


def tokenizer_files(meta: Mapping[str, Any], hf_config: Mapping[str, Any]) -> dict[str, str]:
    """File name → contents of the tokenizer and generation config files for a
    checkpoint converted from a GGUF with this metadata."""
    files: dict[str, str] = {}
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id")
                  if hf_config.get(k) is not None}
    if "tokenizer.ggml.padding_token_id" in meta:
        generation["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    if generation:
        files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
    tok = build_tokenizer(meta)
    if tok is None:
        return files
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {name: tokens[i] for name, i in _special_ids(meta).items()}
    config.update(
        add_bos_token=add_bos_default(meta),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=int(hf_config.get("max_position_embeddings", 4096)),
        tokenizer_class="PreTrainedTokenizerFast",
    )
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = str(meta["tokenizer.chat_template"])
    files["tokenizer.json"] = tok.to_str()
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files
