"""Real-shaped tokenizers for the supported families, built offline with `tokenizers`.

Each is trained on the demo corpus plus a few multilingual lines and saved as a Hugging
Face model directory has it: `tokenizer.json`, `tokenizer_config.json` (with the chat
template the family's instruct models define) and a `config.json`, so that
`transformers.AutoTokenizer.from_pretrained(dir)` reads it as it reads the real thing:

- "qwen2"/"qwen3": byte-level BPE, NFC, Qwen2's split pattern, `<|endoftext|>`,
  `<|im_start|>`, `<|im_end|>`; no BOS (yet config.json names one, as Qwen2.5 does);
  ChatML template.
- "llama3": byte-level BPE with Llama-3's split pattern, BOS `<|begin_of_text|>` added by a
  TemplateProcessing post-processor; Llama-3's header template.
- "llama2" / "mistral": sentencepiece-style BPE (▁ for spaces, byte fallback, `<unk>`,
  `<s>`, `</s>`), `add_bos_token` in tokenizer_config.json, [INST] template; "llama2"
  has model_type llama (transformers rebuilds its pipeline as LlamaTokenizer), "mistral"
  model_type mistral (transformers reads tokenizer.json as it is).
"""

from __future__ import annotations

import functools
import json
import os

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "models", "demo", "corpus.txt")
# Characters beyond the demo corpus so merges span multi-byte sequences; the test strings
# also use characters that are not here (those go through byte fallback).
EXTRA_LINES = (
    "Zürich, São Paulo, naïve façade, crème brûlée, Ærøskøbing.",
    "東京の天気は晴れです。北京欢迎你。서울은 아름답다.",
    "Emoji: 🙂 🚀 👍 and more 🙂🙂 words.",
    "def add(a, b):\n    return a + b  # sum\n\tif x >= 10: print(f'{x!r}')",
    "  leading spaces and\ttabs\n\nnew lines",
)
VOCAB_SIZE = 512  # the tiny chat models' vocabulary: every id the tokenizer makes fits

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-Instruct's ChatML template, without the tool-calling branches.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role in ['user', 'assistant'] or "
    "(message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
# Meta-Llama-3-Instruct's template: the template writes BOS itself.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Mistral-7B-Instruct's template: alternating user/assistant turns, anything else raises.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

KINDS = ("qwen2", "qwen3", "llama3", "llama2", "mistral")
# kind → (model_type, architecture) of its config.json
MODEL_TYPES = {
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "llama3": ("llama", "LlamaForCausalLM"),
    "llama2": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
}


def _lines() -> list[str]:
    with open(CORPUS, encoding="utf-8") as f:
        return [*f.read().splitlines(), *EXTRA_LINES]


def _byte_level(split: str, specials: list[str], nfc: bool):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_lines(), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _qwen2():
    from tokenizers import processors

    tok = _byte_level(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], nfc=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "add_prefix_space": False, "bos_token": None, "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    ids = {"bos_token_id": tok.token_to_id("<|endoftext|>"),
           "eos_token_id": tok.token_to_id("<|im_end|>")}
    return tok, config, ids


def _llama3():
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level(LLAMA3_SPLIT, specials, nfc=False)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A:0",
            pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", bos)],
        ),
    ])
    config = {
        "bos_token": "<|begin_of_text|>", "chat_template": LLAMA3_TEMPLATE,
        "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return tok, config, {"bos_token_id": bos, "eos_token_id": tok.token_to_id("<|end_of_text|>")}


def _sentencepiece_style(legacy: bool):
    """Llama-2/Mistral's tokenizer.json: ▁ for spaces via normalizers, byte fallback
    tokens <0x00>..<0xFF> after <unk>, <s>, </s>, and a BOS post-processor. `legacy` is
    tokenizer_config.json's flag (Llama-2-chat has false, Mistral-7B-Instruct true)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(specials) - 256,
                                  show_progress=False)
    trainer_tok.train_from_iterator(_lines(), trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    order = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate([*specials, *byte_tokens, *(t for t, _ in order)])}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "chat_template": MISTRAL_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": legacy, "model_max_length": 32768, "pad_token": None,
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    return tok, config, {"bos_token_id": 1, "eos_token_id": 2}


@functools.cache
def _build(kind: str):
    if kind in ("qwen2", "qwen3"):
        return _qwen2()
    if kind == "llama3":
        return _llama3()
    if kind == "llama2":
        return _sentencepiece_style(legacy=False)
    if kind == "mistral":
        return _sentencepiece_style(legacy=True)
    raise ValueError(kind)


def tiny_config(kind: str, **overrides) -> dict:
    """A tiny decoder's config.json for the kind (the chat tests' models use it)."""
    model_type, arch = MODEL_TYPES[kind]
    _, _, ids = _build(kind)
    config = {
        "architectures": [arch], "model_type": model_type, "vocab_size": VOCAB_SIZE,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, **ids,
    }
    if model_type == "qwen3":
        config["head_dim"] = 16
    config.update(overrides)
    return config


def write_tokenizer(kind: str, out_dir: str, template: bool = True,
                    config_overrides: dict | None = None) -> str:
    """Write the kind's tokenizer.json, tokenizer_config.json and config.json into
    `out_dir` (created); without `template` the chat template is left out."""
    tok, tok_config, _ = _build(kind)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tok_config = dict(tok_config, **(config_overrides or {}))
    if not template:
        tok_config.pop("chat_template", None)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(tiny_config(kind), f, indent=2)
    return out_dir
