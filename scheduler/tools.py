"""Tool calling: which format a model speaks, the grammar that forces a call, and parsing calls out of text.

A model learns one way of writing tool calls, and its chat template says which
(``detect_format``): the template that renders ``tools`` also shows the model
how to answer. Three formats cover the common open models:

* ``hermes`` (Qwen 2/2.5/3, Hermes, the built-in tiny model):
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call;
* ``llama3`` (Llama 3.1-3.3 JSON tool calling): the whole answer is
  ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``,
  several calls separated by ``;``;
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3), or
  ``[TOOL_CALLS]name[ARGS]{...}`` per call (v11 templates).

``ToolCallSplitter`` reads a stream of text deltas: text before a format's
opening marker streams on as content; from the marker on, text is held and
parsed when the generation ends. Calls that parse, and name one of the
request's tools, become ``ToolCall``s and the finish reason ``tool_calls``;
anything else is given back as content, so nothing the model wrote is lost.

``call_grammar`` is the lark grammar (llguidance's dialect) that admits only a
call in the model's format to one of the tools, each tool's ``parameters``
schema embedded with ``%json``: ``tool_choice: "required"`` or a named function
is honoured by constrained decoding, not by hoping (scheduler/structured.py).

This module is pure Python: no jinja, tokenizers or llguidance imports.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from scheduler.request import FinishEvent

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
# Compact JSON, as the models were trained to write it (llguidance's %json options).
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    """One function the client offers: its name, description and JSON-schema ``parameters``."""

    name: str
    description: str = ""
    parameters: dict | None = None  # None: the function takes an object of any shape

    def to_template(self) -> dict:
        """The OpenAI shape chat templates iterate over (as transformers passes ``tools``)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters if self.parameters is not None else {"type": "object"}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``none`` (tools shown, never called), ``auto`` (the model decides), ``required``
    (at least one call) or ``function`` (a call to ``name``)."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forces_call(self) -> bool:
        """Whether decoding must produce a call (constrained by ``call_grammar``)."""
        return self.mode in ("required", "function")


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: ``arguments`` is the JSON text of an object, as OpenAI sends it."""

    index: int
    id: str
    name: str
    arguments: str

    @property
    def arguments_object(self) -> dict:
        return json.loads(self.arguments)


# ---------------------------------------------------------------- formats


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes tool calls.

    ``markers``: texts that open a call section anywhere in the answer;
    ``json_at_start``: a section may also open with ``{`` as the answer's first
    non-space character (llama3). ``args_key``: the key holding the arguments."""

    name: str
    markers: tuple[str, ...]
    json_at_start: bool = False
    args_key: str = "arguments"

    def find_section(self, text: str, at_start: bool) -> int | None:
        """Where a call section opens in ``text`` (None: not yet)."""
        hits = [text.find(m) for m in self.markers if m in text]
        if self.json_at_start and at_start and text.lstrip().startswith("{"):
            hits.append(len(text) - len(text.lstrip()))
        return min(hits) if hits else None

    def held_back(self, text: str, at_start: bool) -> int:
        """How many trailing characters of ``text`` may be the start of a section: hold them."""
        if self.json_at_start and at_start and not text.strip():
            return len(text)  # only whitespace so far: the answer may still open with "{"
        best = 0
        for marker in self.markers:
            for n in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:n]):
                    best = max(best, n)
                    break
        return best

    def parse(self, section: str) -> list[tuple[str, dict]] | None:
        """The (name, arguments) of every call in ``section``; None unless all of it is calls."""
        return _PARSERS[self.name](self, section)


def _parse_hermes(fmt: ToolFormat, section: str) -> list[tuple[str, dict]] | None:
    calls, rest = [], section.strip()
    while rest:
        if not rest.startswith("<tool_call>"):
            return None
        end = rest.find("</tool_call>")
        body = rest[len("<tool_call>"):end if end >= 0 else len(rest)]  # an unclosed last block is accepted
        call = _call_object(body, fmt.args_key)
        if call is None:
            return None
        calls.append(call)
        rest = rest[end + len("</tool_call>"):].strip() if end >= 0 else ""
    return calls or None


def _parse_llama3(fmt: ToolFormat, section: str) -> list[tuple[str, dict]] | None:
    text = section.strip().removeprefix("<|python_tag|>").strip()
    calls = []
    decoder = json.JSONDecoder()
    while text:
        try:
            obj, end = decoder.raw_decode(text)
        except json.JSONDecodeError:
            return None
        call = _call_fields(obj, fmt.args_key)
        if call is None:
            return None
        calls.append(call)
        text = text[end:].strip()
        if text.startswith(";"):
            text = text[1:].strip()
        elif text:
            return None
    return calls or None


def _parse_mistral(fmt: ToolFormat, section: str) -> list[tuple[str, dict]] | None:
    text = section.strip()
    if not text.startswith("[TOOL_CALLS]"):
        return None
    body = text[len("[TOOL_CALLS]"):].strip()
    if body.startswith("["):  # v3: a JSON array of calls
        try:
            items = json.loads(body)
        except json.JSONDecodeError:
            return None
        calls = [_call_fields(item, fmt.args_key) for item in items] if isinstance(items, list) else [None]
        return None if not calls or None in calls else calls  # type: ignore[return-value]
    calls = []  # v11: name[ARGS]{...}, each call after its own [TOOL_CALLS]
    for part in text.split("[TOOL_CALLS]")[1:]:
        name, sep, args = part.partition("[ARGS]")
        try:
            arguments = json.loads(args) if sep else None
        except json.JSONDecodeError:
            return None
        if not isinstance(arguments, dict) or not TOOL_NAME.match(name.strip()):
            return None
        calls.append((name.strip(), arguments))
    return calls or None


def _call_object(text: str, args_key: str) -> tuple[str, dict] | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return _call_fields(obj, args_key)


def _call_fields(obj: object, args_key: str) -> tuple[str, dict] | None:
    """(name, arguments) of ``{"name": ..., args_key: {...}}``; arguments may come as JSON text."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(args_key, obj.get("arguments", obj.get("parameters")))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return obj["name"], arguments


_PARSERS = {"hermes": _parse_hermes, "llama3": _parse_llama3, "mistral": _parse_mistral}

FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", ("<tool_call>",)),
    "llama3": ToolFormat("llama3", ("<|python_tag|>",), json_at_start=True, args_key="parameters"),
    "mistral": ToolFormat("mistral", ("[TOOL_CALLS]",)),
}


class NoToolSupport(ValueError):
    """The model's chat template cannot show it tools (or in no format this server parses)."""


def detect_format(chat_template: str) -> ToolFormat:
    """The tool-call format a chat template teaches; ``NoToolSupport`` saying why when there is none."""
    if "<tool_call>" in chat_template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in chat_template:
        return FORMATS["mistral"]
    if "<|python_tag|>" in chat_template or ("tools" in chat_template and "parameters" in chat_template
                                             and "ipython" in chat_template):
        return FORMATS["llama3"]
    if re.search(r"\btools\b", chat_template):
        raise NoToolSupport("this model's chat template renders tools, but in a tool-call format pdcluster "
                            f"does not parse (it knows {', '.join(FORMATS)})")
    raise NoToolSupport("this model's chat template has no tool support, so it cannot be given tools")


# ---------------------------------------------------------------- forcing a call


def call_grammar(fmt: ToolFormat, tools: tuple[Tool, ...], choice: ToolChoice, parallel: bool,
                 special_token_id: dict[str, int]) -> str:
    """Lark text (llguidance) admitting only calls in ``fmt`` to ``tools`` (to ``choice.name`` alone
    for a named choice); one call, or one or more when ``parallel``. ``special_token_id`` maps a
    marker that is a special token of the model to its id (a special token is matched by id)."""
    offered = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    schema = _call_schema(offered, fmt.args_key)
    lines = [f"call: %json {json.dumps(schema)}"]
    if fmt.name == "hermes":
        lines.append(r'block: "<tool_call>\n" call "\n</tool_call>"')
        lines.insert(0, r'start: block ("\n" block)*' if parallel else "start: block")
    elif fmt.name == "llama3":
        lines.insert(0, 'start: call ("; " call)*' if parallel else "start: call")
    else:  # mistral v3
        marker = _literal("[TOOL_CALLS]", special_token_id)
        lines.insert(0, f'start: {marker} "[" call (", " call)* "]"' if parallel else f'start: {marker} "[" call "]"')
    return "\n".join(lines) + "\n"


def _call_schema(tools: list[Tool], args_key: str) -> dict:
    """One call's JSON schema: ``{"name": <a tool's name>, args_key: <that tool's parameters>}``."""
    variants = [{
        "type": "object",
        "properties": {"name": {"const": t.name},
                       args_key: t.parameters if t.parameters is not None else {"type": "object"}},
        "required": ["name", args_key],
        "additionalProperties": False,
    } for t in tools]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "x-guidance": COMPACT_JSON}


def _literal(marker: str, special_token_id: dict[str, int]) -> str:
    """A lark terminal for ``marker``: the special token by id, else its text."""
    token = special_token_id.get(marker)
    return f"<[{token}]>" if token is not None else json.dumps(marker)


# ---------------------------------------------------------------- reading calls from a stream


Delta = tuple["str | ToolCall", "FinishEvent | None"]


class ToolCallSplitter:
    """Splits a stream of text deltas into content and ``ToolCall``s (see the module docstring).

    ``tools`` names the callable functions: a call to any other name is not a
    call, and its text is returned as content."""

    def __init__(self, fmt: ToolFormat, tools: tuple[Tool, ...], *, id_prefix: str = "call_") -> None:
        self.fmt, self._names = fmt, {t.name for t in tools}
        self._id_prefix = id_prefix
        self._pending = ""  # text that may open a section: held back
        self._section: str | None = None  # from the opening marker on
        self._emitted_content = False

    def push(self, text: str) -> str:
        """Content to send now for ``text``, the next delta."""
        if self._section is not None:
            self._section += text
            return ""
        self._pending += text
        at_start = not self._emitted_content
        start = self.fmt.find_section(self._pending, at_start)
        if start is not None:
            out, self._section, self._pending = self._pending[:start], self._pending[start:], ""
            if at_start and not out.strip():
                out = ""  # only whitespace before the first call: no content
        else:
            keep = self.fmt.held_back(self._pending, at_start)
            cut = len(self._pending) - keep
            out, self._pending = self._pending[:cut], self._pending[cut:]
        self._emitted_content |= bool(out.strip())
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: the content still held, and the calls (none if the section did not parse)."""
        if self._section is None:
            return self._pending, []
        calls = self.fmt.parse(self._section)
        if calls is None or any(name not in self._names for name, _ in calls):
            return self._pending + self._section, []
        return self._pending, [ToolCall(i, f"{self._id_prefix}{uuid.uuid4().hex[:24]}", name,
                                        json.dumps(arguments, ensure_ascii=False))
                               for i, (name, arguments) in enumerate(calls)]


async def split_tool_calls(deltas: AsyncIterator[tuple[str, FinishEvent | None]],
                           splitter: ToolCallSplitter) -> AsyncIterator[Delta]:
    """``deltas`` with tool calls taken out: ``(text, None)`` for content, ``(ToolCall, None)``
    for each call once the generation ends, and the finish last, its reason ``tool_calls``
    when there were calls."""
    try:
        async for text, finish in deltas:
            content = splitter.push(text)
            if finish is None:
                if content:
                    yield content, None
                continue
            tail, calls = splitter.finish()
            if content + tail:
                yield content + tail, None
            for call in calls:
                yield call, None
            yield "", (replace(finish, finish_reason="tool_calls") if calls else finish)
            return
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
