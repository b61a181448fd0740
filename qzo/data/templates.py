"""Chat templates: built-in ones for base models that have none, a jinja file, and what a template drops.

``data.chat_template`` is ``null`` (the tokenizer's own), a built-in name, or a path to a
jinja file; :func:`set_chat_template` puts it on the tokenizer, so training, reward
generation and everything else that renders with that tokenizer use the same text. The
built-ins are written here, not fetched (nothing downloads at run time):

- ``chatml``: ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` for every message, the generation
  prompt ``<|im_start|>assistant\\n``; no default system message and no tool calls (a
  ``tool`` message is one more ``<|im_start|>tool`` turn).
- ``llama3``: Llama 3's headers (``<|start_header_id|>ROLE<|end_header_id|>\\n\\n CONTENT
  <|eot_id|>`` after the tokenizer's BOS), no default system message; Llama 3.1's tool
  conventions: the ``tools`` schemas in the system turn after ``Environment: ipython``, a
  call as ``{"name": ..., "parameters": {...}}``, a tool result as an ``ipython`` turn.
- ``qwen2.5``: Qwen2.5-Instruct's template (ChatML with its default system message "You are
  Qwen, created by Alibaba Cloud. You are a helpful assistant."), tools in
  ``<tools></tools>``, calls in ``<tool_call></tool_call>``, results in a user turn's
  ``<tool_response></tool_response>``.

A base model's tokenizer usually lacks these markers as special tokens: they are then
tokenized as ordinary text (a few tokens each), which trains fine; inference must use the
same template (it is saved with the tokenizer).

:func:`check_renders` catches what a template silently drops: tool calls, ``tool``
messages and ``tools`` schemas the template does not render (or raises on) are an error
naming the example and the fix, instead of a model trained on chats with parts missing.

A template is a program (jinja loops), and a file from anywhere may loop for hours
(``{% for i in range(100000) %}{% for j in range(100000) %}``): :func:`render` gives one chat
:data:`RENDER_SECONDS` and then stops the template with a :class:`DataError` naming it (and a
template file over :data:`TEMPLATE_BYTES` is refused before it is read).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import DataError

__all__ = ["BUILTIN", "resolve_template", "template_problem", "set_chat_template", "check_renders", "render"]

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n\\n' }}"
    "{{- 'You have access to the following functions. To call a function, respond with JSON of the form '"
    " + '{\"name\": function name, \"parameters\": dictionary of argument name and its value}.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '{\"name\": \"' + tool_call.name + '\", \"parameters\": ' }}{{- tool_call.arguments | tojson }}{{- '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25 = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- '" + _QWEN_SYSTEM + "' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, '"
    " + '\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + _QWEN_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BUILTIN = {"chatml": CHATML, "llama3": LLAMA3, "qwen2.5": QWEN25}
"""Built-in chat templates by ``data.chat_template`` name."""

#: the longest one chat may take to render, in seconds. The built-ins render a short chat in under 0.1 ms and 16
#: messages of 4 MiB in 0.13 s (2-core Xeon), so a template still running after this loops without end (or nearly)
RENDER_SECONDS = 10.0

#: the largest chat template file read: the built-ins are under 3 KB, Llama 3.1's own (with tools) 4 KB
TEMPLATE_BYTES = 1 << 20

# template text -> how the user named it (data.chat_template), for the error that stops it
_NAMES: dict[str, str] = {value: f"the built-in chat template {name!r}" for name, value in BUILTIN.items()}


def template_problem(value) -> str | None:
    """What is wrong with a ``data.chat_template`` value (``None`` if nothing); config validation names the key."""
    if value is None or value in BUILTIN:
        return None
    if not isinstance(value, str) or not value.strip():
        return f"must be null, a built-in name ({', '.join(BUILTIN)}) or a path to a jinja file; got {value!r:.80}"
    if not _is_file(value):
        shown = repr(value) if len(value) <= 80 else repr(value[:77]) + "..."
        return (f"is {shown}: neither a built-in template ({', '.join(BUILTIN)}) nor an existing file; give one "
                "of those names or the path of a jinja chat template (e.g. templates/mine.jinja)")
    return None


def _is_file(value: str) -> bool:
    try:
        return Path(value).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte: no file of that name
        return False


def resolve_template(value: str) -> str:
    """The jinja text ``data.chat_template`` names: a built-in's, or the file's."""
    problem = template_problem(value)
    if problem:
        raise DataError(f"data.chat_template {problem}")
    if value in BUILTIN:
        return BUILTIN[value]
    path = Path(value).expanduser()
    if path.stat().st_size > TEMPLATE_BYTES:  # before reading it whole
        raise DataError(f"data.chat_template {value!r} is {path.stat().st_size / 2**20:.1f} MiB, over the "
                        f"{TEMPLATE_BYTES >> 20} MiB a chat template may be (they are a few KB); point it at the "
                        "template's jinja file")
    text = path.read_text(encoding="utf-8")
    if "messages" not in text:
        raise DataError(f"data.chat_template {value!r} does not look like a chat template: it never reads "
                        "`messages`; see https://huggingface.co/docs/transformers/chat_templating_writing")
    return text


def set_chat_template(tok, value: str | None) -> None:
    """Put ``data.chat_template`` on the tokenizer (``null``: keep the tokenizer's own)."""
    if value is not None:
        tok.chat_template = resolve_template(value)
        _NAMES.setdefault(tok.chat_template, f"the chat template {value!r} (data.chat_template)")


def render(tok, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None,
           where: str = "chat") -> str:
    """The template's text of ``messages``; a template that raises, or runs past :data:`RENDER_SECONDS`, is a
    :class:`DataError` naming ``where`` (and, for the second, the template)."""
    try:
        with _deadline(RENDER_SECONDS):
            return tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                           add_generation_prompt=generation_prompt)
    except _TooSlow:
        template = getattr(tok, "chat_template", None)
        name = (_NAMES.get(template) if isinstance(template, str) else None) or "the tokenizer's own chat template"
        raise DataError(f"{where}: {name} was stopped after {RENDER_SECONDS:g} s on one chat (a chat "
                        "renders in milliseconds: it loops without end, or nearly); fix its loops, or set "
                        f"data.chat_template to a built-in ({', '.join(BUILTIN)})") from None
    except Exception as exc:  # jinja's TemplateError (raise_exception in the template), TypeError, ...
        roles = sorted({m["role"] for m in messages})
        raise DataError(f"{where}: the chat template cannot render this chat (roles {', '.join(roles)}): "
                        f"{type(exc).__name__}: {exc}. Fix the example, or set data.chat_template to a template "
                        f"that renders it (built-in: {', '.join(BUILTIN)}, or a jinja file)") from None


def check_renders(tok, messages: list[dict], tools: list[dict] | None, full: str, where: str) -> None:
    """Raise :class:`DataError` if the template drops the chat's tool calls, tool messages or tools list.

    ``full`` is the rendered chat. A part counts as dropped when rendering without it gives
    the same text (tool calls, tools) or its content is nowhere in the text (tool messages).
    """
    fix = ("set data.chat_template to one that renders them (built-in: qwen2.5 or llama3, or a jinja file), or "
           "drop them from the data")
    if tools and render(tok, messages, False, None, where) == full:
        raise DataError(f"{where}: the chat template ignores the record's \"tools\" list, so the model would "
                        f"never see the schemas; {fix}")
    for i, m in enumerate(messages):
        if m.get("tool_calls"):
            bare = messages[:i] + [{k: v for k, v in m.items() if k != "tool_calls"}] + messages[i + 1:]
            if render(tok, bare, False, tools, where) == full:
                raise DataError(f"{where}: message {i} has tool_calls but the chat template ignores them (they "
                                f"would be silently left out of training); {fix}")
        elif m["role"] == "tool" and m["content"].strip() and m["content"] not in full:
            raise DataError(f"{where}: message {i} is a tool message but the chat template does not render its "
                            f"content; {fix}")


class _TooSlow(BaseException):
    """Raised inside a template that ran past its time (caught by :func:`render`); a BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` on the way (jinja's, transformers') swallows it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise :class:`_TooSlow` in the code of the ``with`` body once it has run ``seconds``.

    In the main thread a ``SIGALRM`` timer interrupts it (free while nothing is late; the timer a
    caller had set is put back); elsewhere, where signals cannot be handled, a trace function
    checks the clock (slower, and only there).
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        end = time.monotonic() + seconds

        def trace(frame, event, arg):
            if time.monotonic() > end:
                raise _TooSlow
            return trace

        before = sys.gettrace()
        sys.settrace(trace)
        try:
            yield
        finally:
            sys.settrace(before)
        return
    armed = [True]

    def late(signum, frame):
        if armed[0]:  # not after the body is done, in the moment before the timer is stopped
            raise _TooSlow

    start = time.monotonic()
    handler = signal.signal(signal.SIGALRM, late)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        if outer:  # a caller's timer: what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3), interval)
