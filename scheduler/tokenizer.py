"""Tokenize prompts and detokenize streams without loading any weights.

The scheduler gets ``tokenizer.json`` and the chat template from a worker's
Info RPC, so it runs on a NAS or a Raspberry Pi with only ``tokenizers`` and
``jinja2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


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
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(bundle.chat_template) if bundle.chat_template else None

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text for ``messages`` with the assistant turn opened."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.bundle.bos_token, eos_token=self.bundle.eos_token,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def encode(self, text: str) -> list[int]:
        # Special tokens in a rendered chat prompt are already spelled out.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns a token stream into text deltas.

    Decodes the whole sequence each time and emits what is new. A trailing
    U+FFFD means a multi-byte character is still incomplete, so that text is
    held back until the next token completes it."""

    def __init__(self, codec: PromptCodec) -> None:
        self._codec = codec
        self._token_ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        text = self._codec.decode(self._token_ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._codec.decode(self._token_ids))

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


def _raise(message: str) -> None:
    raise ChatTemplateError(message)
