"""Chat messages → prompt text with the checkpoint's chat template (Jinja2, sandboxed).

The template comes from the checkpoint (`chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template`), which the operator trusts; the messages come from users, so rendering
happens in Jinja's immutable sandbox with only the helpers chat templates rely on.
Rendering follows transformers' `apply_chat_template`: blocks trimmed, `messages`,
`add_generation_prompt`, `tools`/`documents` (None) and the named special tokens
(`bos_token`, `eos_token`, ...) as variables, `raise_exception` and `strftime_now`.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Roles that chat templates know; anything else is refused before rendering.
ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
MAX_MESSAGES = 1024
MAX_ROLE_CHARS = 32


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: a bad role, or the template refused them (its
    `raise_exception` message, or the error rendering hit)."""


class NoChatTemplateError(Exception):
    """The checkpoint has no usable chat template."""


def read_chat_template(model_dir: str) -> str | None:
    """The checkpoint's chat template source: `chat_template.jinja`, else the
    `chat_template` of `tokenizer_config.json` (a string, or a list of named templates
    of which "default" is used); None when there is none."""
    path = os.path.join(model_dir, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(model_dir, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Refuse what no template should see: no messages, too many, unknown roles."""
    if not messages:
        raise ChatTemplateError("messages is empty")
    if len(messages) > MAX_MESSAGES:
        raise ChatTemplateError(f"{len(messages)} messages; at most {MAX_MESSAGES} are accepted")
    for i, message in enumerate(messages):
        role = message.get("role", "")
        if role not in ROLES:
            shown = role if len(role) <= MAX_ROLE_CHARS else role[:MAX_ROLE_CHARS] + "..."
            raise ChatTemplateError(
                f"messages[{i}].role {shown!r} is not one of {', '.join(sorted(ROLES))}")
        if not isinstance(message.get("content", ""), str):
            raise ChatTemplateError(f"messages[{i}].content must be a string")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training
        masks in transformers): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which templates do not expect.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    class GuardedNamespace(jinja2.utils.Namespace):
        """`namespace()` whose attribute names cannot reach Python internals."""

        # `self` comes in *args, as in Jinja's own, so that namespace(self=1) works.
        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                GuardedNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            GuardedNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if not isinstance(name, str) or name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"namespace attribute {name!r} is not allowed in a chat template")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now,
        namespace=GuardedNamespace, dict=lambda *a, **k: dict(*a, **k),
    )
    return env


class ChatTemplate:
    """A compiled chat template and the special-token variables it renders with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
            self.error = None
        except Exception as e:  # noqa: BLE001 - any compile failure disables chat only
            self._template = None
            self.error = f"the checkpoint's chat template does not compile: {e}"

    def render(self, messages: Sequence[Mapping[str, str]],
               add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text for `messages` (dicts with role and content)."""
        if self._template is None:
            raise NoChatTemplateError(self.error)
        check_messages(messages)
        chat = [{"role": str(m["role"]), "content": str(m.get("content", ""))} for m in messages]
        try:
            return self._template.render(
                messages=chat, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **variables},
            )
        except Exception as e:  # noqa: BLE001 - the template's verdict on these messages
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
