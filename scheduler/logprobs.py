"""Logprobs in OpenAI's shapes, from the ``TokenEvent``s a request's decode node sent.

The decode engines compute them (workers/engines/sampling.py, ``draw``): the
log-softmax of the logits after the presence/frequency penalties and
``logit_bias``, before temperature, top-k and top-p. This module only renders:

* chat: ``choices[].logprobs = {"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}``;
* completions: ``choices[].logprobs = {"tokens", "token_logprobs",
  "top_logprobs": [{token: logprob}, ...], "text_offset"}``, where each
  ``top_logprobs`` entry holds the top ``logprobs`` tokens plus the chosen one
  (up to ``logprobs + 1``, as OpenAI's legacy API says) and ``text_offset``
  counts characters of the completion from its start.

A token's ``bytes`` are its exact bytes (a byte-level BPE piece may be part of
a UTF-8 character); its ``token`` is those bytes as UTF-8, undecodable bytes
written ``\\xNN`` as OpenAI writes them.

``LogprobTap`` sits between the backend's events and ``text_deltas``: it keeps
every token it passes on, and a route takes the ones not yet rendered each time
it writes a chunk (``take``), so a stream carries every token's logprobs once.
"""
from __future__ import annotations

import json
import weakref
from collections.abc import AsyncIterator, Callable

from scheduler.request import FinishEvent, StopStringReached, TokenEvent, end_at_stop_string
from scheduler.tokenizer import PromptCodec

Events = AsyncIterator[TokenEvent | FinishEvent]
Spell = Callable[[int], tuple[str, bytes]]  # token id -> (text, bytes)


class LogprobTap:
    """Keeps the tokens of one request's events for rendering their logprobs."""

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.codec: PromptCodec | None = None
        self._pending: list[TokenEvent] = []
        self._text_offset = 0  # completions: characters rendered so far

    def wrap(self, events: Events, codec: PromptCodec) -> Events:
        """``events`` unchanged, each token kept until ``take``; closing it closes ``events``."""
        self.codec = codec

        async def tapped() -> Events:
            try:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        self._pending.append(event)
                    yield event
            except StopStringReached as e:  # the text ended at a stop string: tell the backend so
                await end_at_stop_string(events, e)
                raise
            finally:
                await events.aclose()

        return tapped()

    def take(self) -> dict | None:
        """The logprobs object of the tokens seen since the last ``take`` (None when none came)."""
        tokens, self._pending = self._pending, []
        if self.codec is None or not tokens:
            return None
        spell = _speller(self.codec)
        if self.chat:
            return {"content": [chat_entry(t, spell) for t in tokens]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token in tokens:
            text = spell(token.token_id)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(token.logprob)
            top = {spell(i)[0]: lp for i, lp in token.top_logprobs}
            top.setdefault(text, token.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._text_offset)
            self._text_offset += len(text)
        return out


def chat_entry(token: TokenEvent, spell: Spell) -> dict:
    """One token of chat's ``logprobs.content``."""
    text, raw = spell(token.token_id)
    return {"token": text, "logprob": token.logprob, "bytes": list(raw),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)}
                             for (t, b), lp in ((spell(i), lp) for i, lp in token.top_logprobs)]}


# codec -> (its pieces are byte-level, the spellings so far)
_SPELLINGS: weakref.WeakKeyDictionary[PromptCodec, tuple[bool, dict[int, tuple[str, bytes]]]] = \
    weakref.WeakKeyDictionary()


def _speller(codec: PromptCodec) -> Spell:
    """token id -> (text, bytes) for ``codec``'s tokenizer, remembered per codec."""
    if codec not in _SPELLINGS:
        _SPELLINGS[codec] = (_byte_level(codec), {})
    byte_level, spelled = _SPELLINGS[codec]

    def spell(token_id: int) -> tuple[str, bytes]:
        if token_id not in spelled:
            spelled[token_id] = _spell(codec, byte_level, token_id)
        return spelled[token_id]

    return spell


def _spell(codec: PromptCodec, byte_level: bool, token_id: int) -> tuple[str, bytes]:
    piece = codec.tokenizer.id_to_token(token_id)
    if piece is None:  # an id past the tokenizer's vocabulary (a padded embedding row)
        return "", b""
    if byte_level:
        raw = b"".join(bytes([_BYTE_OF[c]]) if c in _BYTE_OF else c.encode() for c in piece)
    elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
        raw = bytes([int(piece[3:5], 16)])
    else:
        raw = piece.replace("\u2581", " ").encode()  # sentencepiece's word boundary
    return raw.decode("utf-8", errors="backslashreplace"), raw


def _byte_level(codec: PromptCodec) -> bool:
    """Whether the tokenizer's pieces are GPT-2 byte-level strings (its decoder says so)."""
    decoder = json.loads(codec.bundle.tokenizer_json).get("decoder") or {}
    types = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
    return "ByteLevel" in types


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE pieces are spelled in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_OF = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
