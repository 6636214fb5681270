"""Text and chat prompts encode as transformers encodes them, for every supported family,
and streamed text is the decode of the whole output (multi-byte characters included)."""

from __future__ import annotations

import os

import pytest

from meshserve.engine.detokenizer import IncrementalDetokenizer
from meshserve.models.chat import ChatTemplate, ChatTemplateError, NoChatTemplateError
from meshserve.models.config import load_hf_config
from meshserve.models.tokenizer import find_tokenizer
from tests import tokenizer_files

TEXTS = (
    "Hello world",
    " Hello world",  # a leading space: Metaspace prepend schemes differ here
    "  two  spaces  and\ttabs\n\nnew lines",
    "Café naïve Zürich, Ångström, crème brûlée",
    "東京の天気は晴れです。서울은 아름답다.",
    "emoji 🙂🚀 and one never trained on: 🦜",
    "def f(x):\n    return x**2  # square",
    "text<|im_end|>after a special token",
    "<s>[INST] inline markers [/INST]</s>",
    "The year 2024 had 365 days; 1234567 is long.",
)
CHATS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Zürich or 東京?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 🙂"},
     {"role": "user", "content": " and then"}],
)
# Templates that refuse a chat (Mistral: roles must alternate, no system turn).
REFUSED = {"mistral": 1, "llama2": 1}


@pytest.fixture(scope="module", params=tokenizer_files.KINDS)
def tokenizers_of(request, tmp_path_factory):
    """(ours, transformers') tokenizer of one family, read from the same directory."""
    import transformers

    kind = request.param
    folder = tokenizer_files.write_tokenizer(kind, str(tmp_path_factory.mktemp(kind)))
    ours = find_tokenizer(folder, load_hf_config(folder))
    return kind, ours, transformers.AutoTokenizer.from_pretrained(folder)


def test_text_encodes_as_transformers(tokenizers_of):
    kind, ours, theirs = tokenizers_of
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], (kind, text)
        assert ours.encode(text, add_special_tokens=False) == theirs(
            text, add_special_tokens=False)["input_ids"], (kind, text)


def test_bos_only_where_the_tokenizer_adds_one(tokenizers_of):
    kind, ours, theirs = tokenizers_of
    first = ours.encode("Hello")[0]
    adds_bos = kind in ("llama3", "llama2", "mistral")
    assert (first == ours.bos_id) == adds_bos, kind
    if kind in ("qwen2", "qwen3"):
        # Qwen's config.json names <|endoftext|> as BOS, yet nothing prepends it.
        assert ours.bos_id is not None and ours.bos_id not in ours.encode("Hello")


def test_chat_renders_and_encodes_as_apply_chat_template(tokenizers_of):
    kind, ours, theirs = tokenizers_of
    for i, chat in enumerate(CHATS):
        if REFUSED.get(kind) == i:
            with pytest.raises(ChatTemplateError, match="alternate"):
                ours.render_chat(chat)
            continue
        text = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert ours.render_chat(chat) == text, (kind, chat)
        ids = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        assert ours.encode_chat(chat) == list(ids), (kind, chat)
        # The template writes BOS where the family has one; nothing is added twice.
        assert ours.encode_chat(chat).count(ours.bos_id) <= 1 or kind in ("qwen2", "qwen3")


def test_a_checkpoint_without_a_template_cannot_chat(tmp_path):
    folder = tokenizer_files.write_tokenizer("qwen2", str(tmp_path / "plain"), template=False)
    ours = find_tokenizer(folder, load_hf_config(folder))
    assert not ours.can_chat
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        ours.render_chat(CHATS[0])
    assert ours.encode("Hello")  # plain text still works


def test_a_chat_template_file_wins_over_tokenizer_config(tmp_path):
    folder = tokenizer_files.write_tokenizer("qwen2", str(tmp_path / "file"))
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    ours = find_tokenizer(folder, load_hf_config(folder))
    assert ours.render_chat(CHATS[0]) == "<user>What is the capital of France?"


@pytest.mark.parametrize("source, message", [
    ("{{ ''.__class__.__mro__ }}", "refused"),
    ("{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns }}", "refused"),
    ("{{ raise_exception('no thanks') }}", "no thanks"),
])
def test_templates_render_in_a_sandbox(source, message):
    template = ChatTemplate(source, {})
    with pytest.raises(ChatTemplateError, match=message):
        template.render(CHATS[0])


def test_unsafe_attributes_render_as_nothing():
    template = ChatTemplate("[{{ messages.__class__ }}{{ messages[0].__init__ }}]", {})
    assert template.render(CHATS[0]) == "[]"


def test_roles_and_sizes_are_checked_before_rendering():
    template = ChatTemplate("{{ messages | length }}", {})
    with pytest.raises(ChatTemplateError, match="role 'wizard'"):
        template.render([{"role": "wizard", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="empty"):
        template.render([])
    with pytest.raises(ChatTemplateError, match="at most"):
        template.render([{"role": "user", "content": "x"}] * 5000)
    assert ChatTemplate("{% if %}", {}).error is not None


def test_streamed_text_equals_the_decode_of_all_output_ids(tokenizers_of):
    """Feed the ids of multi-byte text one by one as a sequence's output would arrive;
    what the stream releases adds up to decode(all output ids). The sentencepiece-style
    families differ only where decode strips the one space it prepends to the first
    token: the stream keeps it, since the prompt before the output gives it context."""
    kind, ours, theirs = tokenizers_of
    prompt = ours.encode("Say it:")
    for text in TEXTS[3:6]:
        output = ours.encode(" " + text, add_special_tokens=False)
        detok = IncrementalDetokenizer(ours, prompt)
        streamed = []
        for token in output:
            detok.add(token)
            part = detok.take()
            assert "\ufffd" not in part, (kind, text)
            streamed.append(part)
        streamed.append(detok.take(final=True))
        whole = theirs.decode(output, skip_special_tokens=True)
        assert ours.decode(output) == whole, (kind, text)
        joined = "".join(streamed)
        assert joined == whole or (kind in ("llama2", "mistral") and joined == " " + whole), (
            kind, joined, whole)
