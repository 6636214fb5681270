"""Tokenizers found in a checkpoint directory: HF `tokenizer.json` or sentencepiece.

Text encodes as transformers (5.x) encodes it, `tokenizer(text)["input_ids"]`:

- Special tokens: tokenizer.json's post-processor adds them (Llama-3's and Mistral's
  TemplateProcessing add BOS, Qwen's ByteLevel adds nothing); transformers 5 ignores
  tokenizer_config.json's `add_bos_token`/`add_eos_token` when tokenizer.json exists. A
  sentencepiece model alone follows those flags, BOS by default (Llama's tokenizer).
- Text pipeline: transformers builds some tokenizer classes' pipelines itself rather
  than reading tokenizer.json's: `LlamaTokenizer` (when tokenizer.json is not byte-level
  and the model type is not mistral, which loads tokenizer.json as it is) splits with
  Metaspace, `Qwen2Tokenizer` with NFC, Qwen2's pattern and ByteLevel. They differ from
  the files on leading spaces and on text after special tokens (chat prompts), so the
  same pipelines are set up here.

The chat template (models/chat.py) renders with this tokenizer's named special tokens,
and rendered text is encoded without adding special tokens: the template writes them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from meshserve.models.chat import ChatTemplate, NoChatTemplateError, read_chat_template
from meshserve.models.config import ModelConfig

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_QWEN_FAMILIES = ("qwen2", "qwen3")
# What transformers' Qwen2Tokenizer splits text with before byte-level BPE.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_tokenizer_config(model_dir: str) -> dict[str, Any]:
    """tokenizer_config.json, with special_tokens_map.json filling named tokens it lacks."""
    settings: dict[str, Any] = {}
    path = os.path.join(model_dir, TOKENIZER_CONFIG)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    path = os.path.join(model_dir, SPECIAL_TOKENS_MAP)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            extra = json.load(f)
        for name in NAMED_SPECIAL_TOKENS:
            if settings.get(name) is None and name in extra:
                settings[name] = extra[name]
    return settings


def _pipeline(raw: str, settings: Mapping[str, Any], family: str) -> str:
    """Which pipeline transformers' AutoTokenizer ends up with: "llama", "qwen2" or "file"."""
    declared = (settings.get("tokenizer_class") or "").removesuffix("Fast")
    if family == "mistral":
        return "file"
    if declared == "LlamaTokenizer":
        return "file" if '"ByteLevel"' in raw else "llama"
    if declared == "Qwen2Tokenizer" or (not declared and family in _QWEN_FAMILIES):
        return "qwen2"
    return "file"


def _as_llama_tokenizer(tok, settings: Mapping[str, Any]) -> None:
    from tokenizers import decoders, pre_tokenizers

    prefix = settings.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if settings.get("legacy", False) else "first") if prefix else "never"
    tok.model.fuse_unk, tok.model.byte_fallback, tok.model.ignore_merges = True, True, False
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)


def _as_qwen2_tokenizer(tok, settings: Mapping[str, Any]) -> None:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    model = tok.model
    model.fuse_unk, model.byte_fallback, model.ignore_merges = False, False, False
    model.continuing_subword_prefix, model.end_of_word_suffix = "", ""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(settings.get("add_prefix_space")),
                                 use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()


def _load_hf(path: str, settings: Mapping[str, Any], family: str):
    import tokenizers
    from tokenizers import AddedToken

    with open(path, encoding="utf-8") as f:
        raw = f.read()
    tok = tokenizers.Tokenizer.from_str(raw)
    kind = _pipeline(raw, settings, family)
    if kind == "llama":
        _as_llama_tokenizer(tok, settings)
    elif kind == "qwen2":
        _as_qwen2_tokenizer(tok, settings)
    # Named special tokens stay whole in text and are skipped when decoding, even where
    # tokenizer.json lists them as plain vocabulary.
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    named = [_token_text(settings.get(n)) for n in NAMED_SPECIAL_TOKENS]
    missing = [t for t in named if t and t not in added and tok.token_to_id(t) is not None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok


class Tokenizer:
    """encode/decode over either backend, and chat prompts with the checkpoint's template.

    `bos_id`/`eos_ids` are the model's (config.json, generation_config.json); they are
    skipped when decoding but added only where the tokenizer itself adds them."""

    def __init__(self, path: str, config: ModelConfig):
        self.path = path
        model_dir = os.path.dirname(os.path.abspath(path))
        settings = read_tokenizer_config(model_dir)
        self.bos_id = config.bos_token_id
        self.eos_ids = tuple(config.eos_token_ids)
        self.special_tokens: dict[str, str] = {}
        if path.endswith(".json"):
            self._hf = _load_hf(path, settings, config.family)
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            by_id = self._hf.id_to_token
        else:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            by_id = self._sp.id_to_piece
            # Control pieces (<s>, </s>) and <unk> in text are those tokens, as in
            # transformers; sentencepiece alone would spell them out.
            controls = [self._sp.id_to_piece(i) for i in range(self.vocab_size)
                        if self._sp.IsControl(i) or self._sp.IsUnknown(i)]
            self._sp_controls = {p: self._sp.piece_to_id(p) for p in controls}
            self._sp_split = (re.compile("(" + "|".join(map(re.escape, controls)) + ")")
                              if controls else None)
            self._sp_bos = self.bos_id if self.bos_id is not None else (
                self._sp.bos_id() if self._sp.bos_id() >= 0 else None)
            self._sp_eos = self.eos_ids[0] if self.eos_ids else (
                self._sp.eos_id() if self._sp.eos_id() >= 0 else None)
            self._sp_add_bos = bool(settings.get("add_bos_token", True))
            self._sp_add_eos = bool(settings.get("add_eos_token", False))
        for name in NAMED_SPECIAL_TOKENS:
            text = _token_text(settings.get(name))
            if text is not None:
                self.special_tokens[name] = text
        # Without a word from tokenizer_config.json (a null counts), the model's ids name them.
        fallback = {"bos_token": self.bos_id,
                    "eos_token": self.eos_ids[0] if self.eos_ids else None}
        for name, token_id in fallback.items():
            if name not in settings and token_id is not None and 0 <= token_id < self.vocab_size:
                self.special_tokens[name] = by_id(token_id)
        source = read_chat_template(model_dir)
        self.chat_template = ChatTemplate(source, self.special_tokens) if source else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, the BOS/EOS this tokenizer adds
        (none for Qwen, BOS for Llama and Mistral), as transformers' tokenizer(text)."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids: list[int] = []
        pieces = self._sp_split.split(text) if self._sp_split else [text]
        for piece in pieces:
            if piece in self._sp_controls:
                ids.append(self._sp_controls[piece])
            elif piece:
                ids.extend(self._sp.encode(piece))
        if add_special_tokens:
            if self._sp_add_bos and self._sp_bos is not None:
                ids.insert(0, self._sp_bos)
            if self._sp_add_eos and self._sp_eos is not None:
                ids.append(self._sp_eos)
        return ids

    @property
    def can_chat(self) -> bool:
        """Whether the checkpoint has a chat template that compiles."""
        return self.chat_template is not None and self.chat_template.error is None

    def render_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` by the checkpoint's chat template; raises
        NoChatTemplateError, or ChatTemplateError for messages the template refuses."""
        if self.chat_template is None:
            raise NoChatTemplateError(
                "the model has no chat template (no chat_template.jinja, nor chat_template in "
                "tokenizer_config.json); send prompt or token_ids instead of messages")
        return self.chat_template.render(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> list[int]:
        """transformers' apply_chat_template(messages, add_generation_prompt=True,
        tokenize=True): the special tokens are the template's, none are added."""
        return self.encode(self.render_chat(messages, add_generation_prompt),
                           add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            special = set(self.eos_ids) | ({self.bos_id} if self.bos_id is not None else set())
            ids = [i for i in ids if i not in special]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            return self._sp.decode(ids)
        # sentencepiece drops control pieces when decoding; spell them as transformers does.
        out, run = [], []
        for i in ids:
            if self._sp.IsControl(i):
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join([*out, self._sp.decode(run)])


def find_tokenizer(model_dir: str, config: ModelConfig) -> Tokenizer | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            return Tokenizer(path, config)
    return None
