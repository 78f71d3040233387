"""Chat templates: the messages of a chat request as one prompt string.

A checkpoint with a ``chat_template`` (in ``tokenizer_config.json``, or a ``chat_template.jinja`` file beside it, as
transformers saves it) is rendered the way ``transformers``' ``apply_chat_template`` renders it: jinja2's
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, the
``tojson`` filter and the ``raise_exception`` and ``strftime_now`` globals, called with ``messages``,
``add_generation_prompt=True`` and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...). The rendered
text is tokenized without adding special tokens (the template writes them), as transformers does.

Without one, moekit's own models (trained on plain text, no special tokens) get :data:`DEFAULT_CHAT_TEMPLATE`: each
message as its role in a marker line and its content, then the assistant's marker::

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

and the markers are stop strings, so the reply ends where the model starts the next turn.

Messages: ``role`` one of system, developer (rendered as system), user, assistant; ``content`` a string or OpenAI's
list of parts, of which only ``{"type": "text", "text": ...}`` parts are accepted (joined with newlines). Anything
else is a :class:`~moekit.serve.protocol.RequestError` naming the message and field. jinja2 is imported when a
checkpoint template is compiled (the ``[serve]`` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from moekit.serve.protocol import SERVE_EXTRA, RequestError, shown

ROLES = ("system", "developer", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 saves the template here, beside tokenizer_config.json
# moekit's default: a marker line per role; the markers double as stop strings
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
DEFAULT_STOP = ("<|user|>", "<|system|>", "<|assistant|>")
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as ``[{"role", "content"}]`` with string content; a bad one raises a 400 naming it."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"messages: must be a non-empty list of messages, got {shown(messages)}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where}: must be an object with role and content, got {shown(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role: must be one of {', '.join(ROLES)}, got {shown(role)}", f"{where}.role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(m.get("content"), f"{where}.content")})
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: must be a string or a list of text parts, got {shown(content)}", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            got = part.get("type") if isinstance(part, dict) else part
            raise RequestError(f"{where}[{j}]: only {{'type': 'text', 'text': ...}} parts are supported, got "
                               f"{shown(got)}", f"{where}[{j}]")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{j}].text: must be a string, got {shown(part.get('text'))}",
                               f"{where}[{j}].text")
        texts.append(part["text"])
    return "\n".join(texts)


@dataclass
class ChatTemplate:
    """A compiled chat template. ``source``: the jinja text; ``special``: the tokens the template may name
    (``bos_token`` ...); ``stop``: stop strings every chat request gets (the default template's markers);
    ``origin``: where the template came from (``"default"``, or the file it was read from)."""

    source: str = DEFAULT_CHAT_TEMPLATE
    special: dict[str, str] = field(default_factory=dict)
    stop: tuple[str, ...] = DEFAULT_STOP
    origin: str = "default"

    def __post_init__(self) -> None:
        self._template = _compile(self.source, self.origin)

    def render(self, messages: Any) -> str:
        """The prompt text of ``messages`` (checked first) followed by the assistant's turn opening."""
        msgs = check_messages(messages)
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=msgs, add_generation_prompt=True, tools=None, documents=None,
                                         **{k: self.special.get(k, "") for k in _SPECIAL})
        except TemplateError as e:  # raise_exception() in the template: it refuses these messages
            raise RequestError(f"messages: the model's chat template refused them: {e}", "messages") from None


def load_chat_template(config: dict[str, Any], directory: str | Path | None = None) -> ChatTemplate:
    """The checkpoint's chat template, from its tokenizer config dict (``Tokenizer.config``) or ``directory``'s
    ``chat_template.jinja``; moekit's default where there is none."""
    source, origin = None, "default"
    file = None if directory is None else Path(directory) / TEMPLATE_FILE
    if file is not None and file.is_file():
        source, origin = file.read_text(encoding="utf-8"), str(file)
    elif config.get("chat_template"):
        source, origin = config["chat_template"], "tokenizer_config.json"
        if isinstance(source, list):  # named templates [{"name", "template"}]: the "default" one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
            if not isinstance(source, str):
                raise ValueError(f"tokenizer_config.json: chat_template lists {sorted(map(str, named))} but no "
                                 "'default' template")
    if source is None:
        return ChatTemplate()
    special = {k: _token_text(config.get(k)) for k in _SPECIAL if config.get(k) is not None}
    return ChatTemplate(source=source, special=special, stop=(), origin=origin)


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else str(token)  # (HF AddedToken: {"content": ...})


def _compile(source: str, origin: str):
    """The template compiled as transformers compiles it (``_compile_jinja_template``)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError(f"chat templates need jinja2: {SERVE_EXTRA}") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks the assistant's tokens with it): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{origin}: the chat template is not valid jinja (line {e.lineno}: {e.message})") from e
