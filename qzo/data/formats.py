"""Record formats: one record (a JSONL line or a ``datasets`` row) -> an :class:`Example`.

An example is either a chat (a list of ``{"role", "content"}`` messages, rendered later by
the chat template, loss on the assistant turns) or raw text (tokenized as is, loss on every
token: continued pre-training). The formats, as ``data.format`` names them:

- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``
  (HF / OpenAI / TRL conversational). An assistant message may carry ``tool_calls``
  (``[{"type": "function", "function": {"name", "arguments"}}]``; string arguments that are
  JSON objects are parsed), a tool message ``name`` / ``tool_call_id``; a record-level
  ``tools`` list (function schemas) goes to the chat template.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|..., "value": str}, ...]}``
  with the role names of :data:`SHAREGPT_ROLES` (``human``/``user`` -> user,
  ``gpt``/``assistant``/``model``/``bot``/``chatgpt`` -> assistant, ``system``, ``tool``/
  ``observation``/``function``/``ipython`` -> tool, ``function_call`` -> an assistant tool
  call whose value is ``{"name", "arguments"}`` JSON); a ``tools`` list (or its JSON
  string, as LLaMA-Factory stores it).
- ``alpaca``: ``{"instruction", "input" (optional), "output"}`` -> a user turn (the
  instruction, plus ``"\\n\\n"`` and the input when non-empty) and an assistant turn.
- ``completion``: ``{"prompt", "completion"}``, both strings (a user turn and an assistant
  turn) or both message lists (TRL's conversational prompt-completion: the prompt's
  messages, then the completion's; only the completion's assistant turns are trained).
- ``text``: ``{"text": str}``: raw text, no chat template.

``auto`` tries them in that order, so a record with ``messages`` is a chat whatever else it
holds; fields whose value is ``null`` count as absent (``datasets`` fills a column missing
from a row with ``None``). In every chat format a record-level ``system`` string becomes the
system message of a chat that has none (before ``data.system_prompt`` is considered).

Other layouts map onto these with ``data.fields`` (:func:`check_fields`): qzo's name ->
the dataset's, for record fields (``messages``, ``conversations``, ``prompt``,
``completion``, ``instruction``, ``input``, ``output``, ``text``, ``system``, ``tools``),
for message keys (``role``, ``content``, ``tool_calls``), and ``roles``: the dataset's role
names -> qzo's (``{bot: assistant, human: user}``). E.g. ``{messages: conv, role: speaker,
content: text}`` reads ``{"conv": [{"speaker": "user", "text": "..."}]}`` as a chat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import DataError

__all__ = ["FORMATS", "ROLES", "SHAREGPT_ROLES", "FIELD_KEYS", "Example", "to_example", "check_fields",
           "apply_fields"]

FORMATS = ("auto", "chat", "sharegpt", "alpaca", "completion", "text")
"""Record formats: ``auto`` detects each record's format; the others force one."""
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", "function": "tool", "function_response": "tool", "ipython": "tool",
    "function_call": "assistant",  # its value is the call: {"name", "arguments"} JSON (LLaMA-Factory)
}
RECORD_FIELDS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "text",
                 "system", "tools")
MESSAGE_FIELDS = ("role", "content", "tool_calls")
FIELD_KEYS = (*RECORD_FIELDS, *MESSAGE_FIELDS, "roles")
"""The keys ``data.fields`` takes: record fields, message keys, and ``roles`` (a mapping)."""

_EXPECTED = {
    "chat": 'a non-empty "messages" list',
    "sharegpt": 'a non-empty "conversations" list (ShareGPT)',
    "alpaca": '"instruction" and "output" strings (and an optional "input")',
    "completion": '"prompt" and "completion" (strings, or message lists)',
    "text": 'a "text" string',
}
_REQUIRED = {"chat": {"messages"}, "sharegpt": {"conversations"}, "alpaca": {"instruction", "output"},
             "completion": {"prompt", "completion"}, "text": {"text"}}
_ROLE_HINT = ("roles are system, user, assistant, tool; for ShareGPT names (human, gpt, ...) use data.format "
              "sharegpt, for others map them with data.fields.roles")


@dataclass
class Example:
    """One training example: a chat (``messages``) or raw text (``text``), and where it came from.

    ``first_trained``: assistant turns before this message index are prompt, not trained
    (a conversational prompt-completion record's prompt). ``tools``: function schemas
    passed to the chat template. ``where``: ``file.jsonl:3`` or ``hf:... row 2``, for errors.
    """

    messages: list[dict] | None = None
    text: str | None = None
    tools: list[dict] | None = None
    first_trained: int = 0
    where: str = "record"


def check_fields(fields) -> str | None:
    """What is wrong with a ``data.fields`` value (``None`` if nothing); config validation names the key."""
    if fields is None:
        return None
    if not isinstance(fields, dict) or not fields:
        return ("must be null or a mapping of qzo's field names to the dataset's, e.g. {messages: conv}; "
                f"got {fields!r}")
    unknown = [k for k in fields if k not in FIELD_KEYS]
    if unknown:
        return f"has unknown keys {unknown}; the keys are {', '.join(FIELD_KEYS)}"
    for k, v in fields.items():
        if k == "roles":
            if not isinstance(v, dict) or not v or not all(isinstance(a, str) and b in ROLES for a, b in v.items()):
                return (f"roles must map the dataset's role names to one of {', '.join(ROLES)}, e.g. "
                        f"{{bot: assistant, human: user}}; got {v!r}")
        elif not isinstance(v, str) or not v.strip():
            return f"{k} must name a field of the dataset (a non-empty string), got {v!r}"
    return None


def _rename_message(m, keys: dict, roles: dict | None):
    if not isinstance(m, dict):
        return m
    m = dict(m)
    for ours, theirs in keys.items():
        if theirs in m and theirs != ours:
            m[ours] = m.pop(theirs)
    for key in ("role", "from"):  # "from": ShareGPT's role key
        if roles and isinstance(m.get(key), str) and m[key] in roles:
            m[key] = roles[m[key]]
    return m


def apply_fields(record: dict, fields: dict | None) -> dict:
    """``record`` with the dataset's field names (``data.fields``) renamed to qzo's."""
    if not fields:
        return record
    record = dict(record)
    for ours in RECORD_FIELDS:
        theirs = fields.get(ours)
        if theirs is not None and theirs in record and theirs != ours:
            record[ours] = record.pop(theirs)
    keys = {k: fields[k] for k in MESSAGE_FIELDS if k in fields}
    roles = fields.get("roles")
    if keys or roles:
        for name in ("messages", "conversations", "prompt", "completion"):
            if isinstance(record.get(name), list):
                record[name] = [_rename_message(m, keys, roles) for m in record[name]]
    return record


def _drop_nulls(value):
    """Nulls out of dicts, recursively: a ``datasets`` struct column gives every row every key."""
    if isinstance(value, dict):  # a tool call's arguments are the user's JSON: kept as they are
        return {k: v if k == "arguments" else _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _str_field(record: dict, key: str, where: str, fmt: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string in the {fmt} format, got {type(value).__name__}')
    return value


def _tool_calls(calls, where: str, i: int) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise DataError(f'{where}: message {i} "tool_calls" must be a non-empty list of '
                        '{"type": "function", "function": {"name", "arguments"}}')
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f'{where}: message {i} has a tool call without a function "name"; write '
                            '{"type": "function", "function": {"name": ..., "arguments": {...}}}')
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI stores the arguments as a JSON string; templates want the object
            try:
                parsed = json.loads(args)
                args = parsed if isinstance(parsed, dict) else args
            except json.JSONDecodeError:
                pass
        out.append({**(call if "function" in call else {}), "type": "function",
                    "function": {**fn, "arguments": args}})
    return out


def _content(content, role: str, where: str, i: int) -> str:
    """A message's text: a string; a list of text parts (HF / OpenAI) joined; a tool's JSON result as JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if role == "tool" and isinstance(content, (dict, list)):
        return json.dumps(content, ensure_ascii=False)
    if isinstance(content, list):
        kinds = sorted({str(p.get("type")) if isinstance(p, dict) else type(p).__name__ for p in content})
        raise DataError(f"{where}: message {i} ({role}) has content parts of types {', '.join(kinds)}; qzo trains "
                        'text only: give a string or [{"type": "text", "text": ...}] parts')
    raise DataError(f'{where}: message {i} ({role}) needs a string "content"')


def _messages(messages, where: str, what: str = '"messages"') -> list[dict]:
    """Checked chat messages: canonical roles, string content (tool calls may stand for it)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {what} must be a non-empty list of messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise DataError(f'{where}: message {i} needs a "role" ({_ROLE_HINT}); got {role!r}')
        m = dict(m)
        if "tool_calls" in m:
            if m["role"] != "assistant":
                raise DataError(f'{where}: message {i} has "tool_calls" but role {m["role"]!r}; only assistant '
                                "messages call tools")
            m["tool_calls"] = _tool_calls(m["tool_calls"], where, i)
            m.setdefault("content", "")
        m["content"] = _content(m.get("content"), m["role"], where, i)
        chat.append(m)
    return chat


def _tools(value, where: str) -> list[dict] | None:
    if value is None:
        return None
    if isinstance(value, str):  # LLaMA-Factory's ShareGPT keeps the schemas as a JSON string
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as exc:
            raise DataError(f'{where}: "tools" is a string but not JSON ({exc.msg}); give a list of function '
                            "schemas") from None
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f'{where}: "tools" must be a list of function schemas (objects)')
    return value or None


def _sharegpt(record: dict, where: str) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: "conversations" must be a non-empty list of {{"from", "value"}} turns')
    chat = []
    for i, t in enumerate(turns):
        speaker = t.get("from", t.get("role")) if isinstance(t, dict) else None
        value = t.get("value", t.get("content")) if isinstance(t, dict) else None
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise DataError(f'{where}: turn {i} has "from" {speaker!r}; ShareGPT roles are '
                            f"{', '.join(SHAREGPT_ROLES)} (map others with data.fields.roles)")
        if not isinstance(value, str):
            raise DataError(f'{where}: turn {i} needs a string "value"')
        if str(speaker).lower() == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError:
                call = None
            calls = call if isinstance(call, list) else [call]
            chat.append({"role": "assistant", "content": "",
                         "tool_calls": _tool_calls([{"function": c} for c in calls], where, i)})
        else:
            chat.append({"role": role, "content": value})
    return chat


def _detect(record: dict) -> str | None:
    for fmt in ("chat", "sharegpt", "alpaca", "completion", "text"):
        if _REQUIRED[fmt] <= set(record):
            return fmt
    return None


def to_example(record, format: str = "auto", system_prompt: str | None = None, where: str = "record",
               fields: dict | None = None) -> Example:
    """One record as an :class:`Example` (see the module docs for the formats and ``fields``).

    ``system_prompt``, when not ``None``, is prepended as a ``system`` message to a chat
    that has none (raw text gets none). Raises :class:`DataError` starting with ``where``
    (e.g. ``file.jsonl:3``) that says which fields were expected and which were found.
    """
    if format not in FORMATS:
        raise DataError(f"data.format is {format!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record = _drop_nulls(apply_fields(record, fields))
    found = ", ".join(map(str, record)) or "none"
    if format == "auto":
        fmt = _detect(record)
        if fmt is None:
            raise DataError(f"{where}: expected an object with {_EXPECTED['chat']}, or {_EXPECTED['sharegpt']}, "
                            f"or {_EXPECTED['alpaca']}, or {_EXPECTED['completion']}, or {_EXPECTED['text']}; "
                            f"found fields: {found} (name yours with data.fields)")
    else:
        fmt = format
        if not _REQUIRED[fmt] <= set(record):
            raise DataError(f'{where}: data.format "{fmt}" expects {_EXPECTED[fmt]}; found fields: {found} '
                            "(name yours with data.fields)")
    tools = _tools(record.get("tools"), where)
    first = 0
    if fmt == "text":
        text = _str_field(record, "text", where, fmt)
        if not text.strip():
            raise DataError(f'{where}: "text" is empty: there is nothing to train on; drop the line')
        return Example(text=text, where=where)
    if fmt == "chat":
        chat = _messages(record["messages"], where)
    elif fmt == "sharegpt":
        chat = _messages(_sharegpt(record, where), where)
    elif fmt == "alpaca":
        user = _str_field(record, "instruction", where, fmt)
        extra = _str_field(record, "input", where, fmt) if "input" in record else ""
        if extra:
            user = f"{user}\n\n{extra}"
        chat = [{"role": "user", "content": user},
                {"role": "assistant", "content": _str_field(record, "output", where, fmt)}]
    elif isinstance(record["prompt"], list) or isinstance(record["completion"], list):
        if not (isinstance(record["prompt"], list) and isinstance(record["completion"], list)):
            raise DataError(f'{where}: "prompt" and "completion" must both be strings or both message lists '
                            "(TRL's conversational prompt-completion)")
        prompt = _messages(record["prompt"], where, '"prompt"')
        chat = prompt + _messages(record["completion"], where, '"completion"')
        first = len(prompt)
    else:
        chat = [{"role": "user", "content": _str_field(record, "prompt", where, fmt)},
                {"role": "assistant", "content": _str_field(record, "completion", where, fmt)}]
    if not any(m["role"] == "assistant" for m in chat[first:]):
        raise DataError(f"{where}: the chat has no assistant turn{' in its completion' if first else ''}, so there "
                        "is nothing to train on")
    for i, m in enumerate(chat[first:], first):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            # it would train on the end-of-turn marker alone: replying nothing, which is a data bug far more often
            raise DataError(f"{where}: message {i} (assistant) is empty: there is no reply to train on; fill it in "
                            "or drop the record")
    own = record.get("system") if isinstance(record.get("system"), str) and record["system"] else None
    for system in (own, system_prompt):  # the record's own system message, else data.system_prompt
        if system is not None and not any(m["role"] == "system" for m in chat):
            chat.insert(0, {"role": "system", "content": system})
            first += 1 if first else 0
    return Example(messages=chat, tools=tools, first_trained=first, where=where)
