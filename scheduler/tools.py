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
parsed when the generation ends. Calls that parse, name one of the request's
tools and (for a ``strict`` tool) follow its schema become ``ToolCall``s and
the finish reason ``tool_calls``; anything else is given back as content.
Stop strings never apply inside a call (``api_stream.text_deltas``'s
``section_at``).

``call_grammar`` is the lark grammar (llguidance's dialect) that admits only a
call in the model's format to one of the tools, each tool's ``parameters``
schema embedded with ``%json``: ``tool_choice: "required"`` or a named function
is honoured by constrained decoding, not by hoping (scheduler/structured.py).

This module imports no jinja, tokenizers or llguidance (``jsonschema`` checks strict tools' arguments).
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jsonschema

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
    strict: bool = False  # a call's arguments must follow ``parameters``, or it is no call

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
    non-space character (llama3). ``args_key``: the key holding the arguments.
    ``specials``: the format's texts that are special tokens in its models'
    tokenizers, spelled out in the text so the parser sees them.
    ``single_call``: the model's template takes one call per turn (Llama 3.1-3.3)."""

    name: str
    markers: tuple[str, ...]
    json_at_start: bool = False
    args_key: str = "arguments"
    specials: tuple[str, ...] = ()
    single_call: bool = False

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
        calls, rest = self.extract(section)
        return [(name, args) for name, args, _ in calls] if calls and not rest.strip() else None

    def extract(self, section: str) -> tuple[list[tuple[str, dict, str]], str]:
        """The calls in ``section`` as (name, arguments, their text), and the text that is no call.
        hermes takes each ``<tool_call>`` block that parses (text around them is content); the
        other formats take the whole section or nothing."""
        if self.name == "hermes":
            return _extract_hermes(self, section)
        calls = _PARSERS[self.name](self, section)
        return ([(name, args, section) for name, args in calls], "") if calls else ([], section)

    def call_id(self) -> str:
        """A new call's id: Mistral's templates take exactly nine letters and digits."""
        return uuid.uuid4().hex[:9] if self.name == "mistral" else f"call_{uuid.uuid4().hex[:24]}"

    def history_id(self, call_id: str) -> str:
        """A client's call id as the template takes it (the same id maps the same way every time)."""
        if self.name != "mistral" or re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
            return call_id
        return hashlib.sha1(call_id.encode()).hexdigest()[:9]


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def _extract_hermes(fmt: ToolFormat, section: str) -> tuple[list[tuple[str, dict, str]], str]:
    calls, content, at = [], [], 0
    for block in _HERMES_BLOCK.finditer(section):
        call = _call_object(block.group(1), fmt.args_key)
        if call is None:
            continue  # not a call: stays in the content
        content.append(section[at:block.start()])
        calls.append((*call, block.group(0)))
        at = block.end()
    content.append(section[at:])
    return calls, "".join(content) if calls else section


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
    calls = []  # v11: name[ARGS]{...} (name[CALL_ID]id[ARGS]{...} in some), each after its own [TOOL_CALLS]
    for part in text.split("[TOOL_CALLS]")[1:]:
        name, sep, args = part.partition("[ARGS]")
        name = name.partition("[CALL_ID]")[0].strip()
        try:
            arguments = json.loads(args) if sep else None
        except json.JSONDecodeError:
            return None
        if not isinstance(arguments, dict) or not TOOL_NAME.match(name):
            return None
        calls.append((name, arguments))
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


_PARSERS = {"llama3": _parse_llama3, "mistral": _parse_mistral}

FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", ("<tool_call>",), specials=("<tool_call>", "</tool_call>")),
    "llama3": ToolFormat("llama3", ("<|python_tag|>",), json_at_start=True, args_key="parameters",
                         specials=("<|python_tag|>",), single_call=True),
    "mistral": ToolFormat("mistral", ("[TOOL_CALLS]",), specials=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")),
}
# hermes: the template shows the call as <tool_call>\n{"name": ... (JSON), not as XML (<function=...>)
_HERMES_JSON = re.compile(r'<tool_call>(?:\\n|\n)\{(?:\\"|")name')


class NoToolSupport(ValueError):
    """The model's chat template cannot show it tools (or in no format this server parses)."""


def detect_format(chat_template: str) -> ToolFormat:
    """The tool-call format a chat template teaches; ``NoToolSupport`` saying why when there is none."""
    if _HERMES_JSON.search(chat_template):
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


def mistral_v11(chat_template: str) -> bool:
    """Whether a Mistral template writes calls as ``[TOOL_CALLS]name[ARGS]{...}`` (v11) rather than a JSON array."""
    return "[ARGS]" in chat_template


# ---------------------------------------------------------------- forcing a call


def call_grammar(fmt: ToolFormat, tools: tuple[Tool, ...], choice: ToolChoice, parallel: bool,
                 special_token_id: dict[str, int], *, v11: bool = False) -> str:
    """Lark text (llguidance) admitting only calls in ``fmt`` to ``tools`` (to ``choice.name`` alone
    for a named choice); one call, or one or more when ``parallel`` (never for a single-call format).
    Each tool's schema is its own ``%json`` root, so its ``$ref``s resolve. ``special_token_id`` maps
    a format text that is a special token of the model to its id (matched by id); ``v11``: Mistral's
    ``[TOOL_CALLS]name[ARGS]{...}`` form."""
    offered = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    parallel = parallel and not fmt.single_call

    def lit(text: str) -> str:
        token = special_token_id.get(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    lines = [f"call: {' | '.join(f'call_{i}' for i in range(len(offered)))}"]
    for i, tool in enumerate(offered):
        schema = json.dumps({**(tool.parameters or {"type": "object"}), "x-guidance": COMPACT_JSON})
        if fmt.name == "mistral" and v11:
            body = f"{lit('[TOOL_CALLS]')} {json.dumps(tool.name)} {lit('[ARGS]')} %json {schema}"
        else:
            head = json.dumps(f'{{"name": "{tool.name}", "{fmt.args_key}": ')
            body = f'{head} %json {schema} "}}"'
        lines.append(f"call_{i}: {body}")
    if fmt.name == "hermes":
        lines.append(f'block: {lit("<tool_call>")} "\\n" call "\\n" {lit("</tool_call>")}')
        start = 'block ("\\n" block)*' if parallel else "block"
    elif fmt.name == "llama3":
        start = "call"
    elif v11:
        start = "call+" if parallel else "call"
    else:  # mistral v3: [TOOL_CALLS] [{...}, ...]
        start = f'{lit("[TOOL_CALLS]")} " [" call (", " call)* "]"' if parallel else \
            f'{lit("[TOOL_CALLS]")} " [" call "]"'
    return f"start: {start}\n" + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- reading calls from a stream


Delta = tuple["str | ToolCall", "FinishEvent | None"]


class ToolCallSplitter:
    """Splits a stream of text deltas into content and ``ToolCall``s (see the module docstring).

    A call counts when it names one of ``tools`` and, for a ``strict`` tool, its
    arguments follow the tool's schema; any other is given back as content.
    Without ``parallel`` (or in a single-call format) only the first call is
    returned, as OpenAI returns at most one."""

    def __init__(self, fmt: ToolFormat, tools: tuple[Tool, ...], *, parallel: bool = True) -> None:
        self.fmt, self._tools = fmt, {t.name: t for t in tools}
        self._max_calls = None if parallel and not fmt.single_call else 1
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
        """At the end: the content still held, and the calls."""
        if self._section is None:
            return self._pending, []
        found, content = self.fmt.extract(self._section)
        calls = []
        for name, arguments, text in found:
            if not self._is_call(name, arguments):
                if self.fmt.name != "hermes":  # one section: one bad call makes all of it text
                    return self._pending + self._section, []
                content += text
            elif self._max_calls is None or len(calls) < self._max_calls:
                calls.append((name, arguments))
        if not calls:
            return self._pending + self._section, []
        return self._pending + (content if content.strip() else ""), [
            ToolCall(i, self.fmt.call_id(), name, json.dumps(arguments, ensure_ascii=False))
            for i, (name, arguments) in enumerate(calls)]

    def _is_call(self, name: str, arguments: dict) -> bool:
        tool = self._tools.get(name)
        if tool is None:
            return False
        if tool.strict and tool.parameters is not None:
            try:
                jsonschema.validate(arguments, tool.parameters)
            except jsonschema.exceptions.ValidationError:
                return False
        return True


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
            yield "", (FinishEvent("tool_calls", finish.stats) if calls else finish)
            return
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
