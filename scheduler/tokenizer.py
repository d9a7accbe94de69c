"""Tokenize prompts and detokenize streams without loading any weights.

The scheduler gets ``tokenizer.json`` and the chat template from a worker's
Info RPC, so it runs on a NAS or a Raspberry Pi with only ``tokenizers`` and
``jinja2``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

if TYPE_CHECKING:
    import llguidance


class ChatTemplateError(ValueError):
    """The messages could not be rendered with the model's chat template."""


@dataclass(frozen=True)
class TokenizerBundle:
    """A model's tokenizer and chat template as a worker reported them."""

    tokenizer_json: str
    chat_template: str
    bos_token: str = ""
    eos_token: str = ""


class PromptCodec:
    """Chat template + tokenizer for one model."""

    def __init__(self, bundle: TokenizerBundle) -> None:
        self.tokenizer = Tokenizer.from_str(bundle.tokenizer_json)
        self.bundle = bundle
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        # transformers' template environment: its tojson (no HTML escaping) and globals
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(bundle.chat_template) if bundle.chat_template else None

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt text for ``messages`` with the assistant turn opened; ``tools`` in
        OpenAI's shape go to the template as transformers' ``apply_chat_template(tools=...)`` passes them."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, tools=tools or None,
                bos_token=self.bundle.bos_token, eos_token=self.bundle.eos_token,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def special_token_id(self, text: str) -> int | None:
        """The id of ``text`` when it is one special (added) token of this tokenizer, else None."""
        token = self.tokenizer.token_to_id(text)
        return token if token is not None and token in self._special_ids else None

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """This tokenizer as llguidance sees it, for checking grammars (scheduler/structured.py)."""
        import llguidance  # only requests with a grammar pay for the import and the build

        eos = self.tokenizer.token_to_id(self.bundle.eos_token) if self.bundle.eos_token else None
        return llguidance.LLTokenizer(self.bundle.tokenizer_json, eos_token=eos)

    def encode(self, text: str) -> list[int]:
        # Special tokens in a rendered chat prompt are already spelled out.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int], keep: frozenset[int] = frozenset()) -> str:
        """Text of ``token_ids`` without special tokens, except those in ``keep`` (spelled out)."""
        if not keep or not keep.intersection(token_ids):
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        parts, run = [], []
        for token in token_ids:
            if token in keep:
                parts += [self.tokenizer.decode(run, skip_special_tokens=True), self.tokenizer.id_to_token(token)]
                run = []
            else:
                run.append(token)
        return "".join(parts) + self.tokenizer.decode(run, skip_special_tokens=True)

    def detokenizer(self, keep: frozenset[int] = frozenset()) -> IncrementalDetokenizer:
        """Text deltas of a token stream; special tokens in ``keep`` are spelled out (a tool-call marker)."""
        return IncrementalDetokenizer(self, keep)


class IncrementalDetokenizer:
    """Turns a token stream into text deltas.

    Decodes the whole sequence each time and emits what is new. A trailing
    U+FFFD means a multi-byte character is still incomplete, so that text is
    held back until the next token completes it."""

    def __init__(self, codec: PromptCodec, keep: frozenset[int] = frozenset()) -> None:
        self._codec, self._keep = codec, keep
        self._token_ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        text = self._codec.decode(self._token_ids, self._keep)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._codec.decode(self._token_ids, self._keep))

    @property
    def text(self) -> str:
        return self._emitted

    def _take(self, text: str) -> str:
        if not text.startswith(self._emitted):
            # A tokenizer may re-segment earlier text; emit only a clean suffix.
            common = _common_prefix_len(text, self._emitted)
            self._emitted = text[:common]
        delta = text[len(self._emitted):]
        self._emitted = text
        return delta


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson`` for chat templates: plain JSON, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ChatTemplateError(message)
