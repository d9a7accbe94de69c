"""Grammar-constrained sampling: llguidance's token masks, one matcher per request.

A request's ``SamplingParams.grammar`` is an llguidance grammar, the
TopLevelGrammar JSON string that ``llguidance.LLMatcher.grammar_from_json_schema``
or ``grammar_from_lark`` return ("" is unconstrained). Two objects carry it:

* ``GrammarTokenizer``: one engine's model tokenizer as llguidance needs it.
  Each engine owns one (``Engine.grammar_tokenizer``), built from the model
  folder's ``tokenizer.json`` on first use and then shared by every request on
  that engine (building it walks the whole vocabulary; a worker warms it at
  start). Both engines read the same file, so a torch prefill node and an mlx
  decode node mask alike.
* ``GrammarMatcher``: one request's parser state. ``mask`` sets the score of
  every token the grammar does not allow next to -inf (token ids past the
  tokenizer's vocabulary, a model's padding rows, too); ``consume`` advances
  it by the drawn token. ``sampling.TokenSampler`` owns it and calls both on
  every draw.

NOTE on how a constrained request ends. Once the grammar is complete the
matcher allows only the model's EOS token(s). ``GrammarTokenizer.constrain``
adds them to a constrained request's stop tokens, even when it has none (a
client's ``ignore_eos``: the scheduler refuses that with a grammar, and a
worker that gets it anyway still ends the stream), so the EOS that the mask
forces ends the request with finish reason "stop" on either engine and a
complete grammar never runs on to ``max_tokens``. ``TokenSampler`` refuses a
grammar whose EOS is not among the stop tokens, so no caller can forget.

A matcher that refuses a token it allowed (``GrammarError``) is a bug, not
bad input: it fails that request only, never the batch it runs in.

Imports numpy, and llguidance only when a grammar is used.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from workers.engines.sampling import SamplingParams


class GrammarError(RuntimeError):
    """A request's matcher refused a token or broke: that request fails, no other."""


class GrammarTokenizer:
    """The model's tokenizer as llguidance sees it: built on first use, then shared.

    ``tokenizer_file``: the model folder's ``tokenizer.json``;
    ``eos_token_ids``: the tokens that end a completed grammar (the model's EOS)."""

    def __init__(self, tokenizer_file: str | Path, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer_file = Path(tokenizer_file)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._lock = threading.Lock()
        self._built: Any = None  # llguidance.LLTokenizer, once built

    @property
    def llg(self) -> Any:
        """The ``llguidance.LLTokenizer`` (built now on first use; safe from any thread).
        ``ValueError`` when the model folder has no ``tokenizer.json``, or it has no EOS."""
        with self._lock:
            if self._built is None:
                import llguidance

                if not self.tokenizer_file.is_file():
                    raise ValueError(f"grammars need the model's tokenizer.json, and {self.tokenizer_file} "
                                     "does not exist")
                if not self.eos_token_ids:
                    raise ValueError("grammars need the model's EOS token, and its config names none")
                self._built = llguidance.LLTokenizer(self.tokenizer_file.read_text(),
                                                     eos_token=list(self.eos_token_ids))
            return self._built

    def check(self, grammar: str) -> str:
        """Why ``grammar`` cannot constrain this model ("" when it can): it does
        not parse or compile against this tokenizer. Safe from any thread."""
        import llguidance

        try:
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.llg)
        except (ValueError, TypeError, RuntimeError) as e:
            return _first_line(str(e)) or type(e).__name__
        return _first_line(messages[0]) if is_error else ""  # warnings do not refuse it

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """``params`` with this model's EOS among its stop tokens when it has a
        grammar (the module's NOTE); ``params`` itself otherwise."""
        missing = tuple(t for t in self.eos_token_ids if t not in params.stop_token_ids)
        if not params.grammar or not missing:
            return params
        return dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, *missing))

    def matcher(self, grammar: str, history: Iterable[int] = ()) -> GrammarMatcher:
        """A new matcher for ``grammar`` that has consumed ``history`` (the tokens a
        request generated before its next draw); ``ValueError`` when either is refused."""
        return GrammarMatcher(self, grammar, history)


class GrammarMatcher:
    """One request's place in its grammar: which tokens may come next."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str, history: Iterable[int] = ()) -> None:
        import llguidance
        import llguidance.numpy

        llg = tokenizer.llg
        self._matcher = llguidance.LLMatcher(llg, grammar)
        if self._matcher.is_error():
            raise ValueError(f"grammar: {_first_line(self._matcher.get_error())}")
        self._vocab_size = int(llg.vocab_size)
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, self._vocab_size)  # [1, words] int32
        self._fill = llguidance.numpy.fill_next_token_bitmask
        history = [int(t) for t in history]
        if history and not self._matcher.consume_tokens(history):
            raise ValueError(f"the tokens generated so far do not match the grammar: "
                             f"{_first_line(self._matcher.get_error())}")

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete: only EOS may follow."""
        return bool(self._matcher.is_stopped())

    def allowed(self) -> np.ndarray:
        """Which token ids may come next: bool ``[tokenizer vocab]``."""
        self._fill(self._matcher, self._bitmask, 0)
        if self._matcher.is_error():
            raise GrammarError(f"grammar matcher failed: {_first_line(self._matcher.get_error())}")
        # bit j of int32 word w is token 32 * w + j: little-endian bytes, least significant bit first
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")  # [32 * words]
        return bits[: self._vocab_size].astype(bool)

    def mask(self, scores: np.ndarray) -> np.ndarray:
        """A copy of ``scores`` [vocab] with -inf for every token the grammar
        does not allow next (ids past the tokenizer's vocabulary included)."""
        allowed = self.allowed()
        num = min(scores.shape[0], allowed.shape[0])
        masked = np.full_like(scores, -np.inf)
        masked[:num] = np.where(allowed[:num], scores[:num], -np.inf)
        return masked

    def consume(self, token: int) -> None:
        """Advance by the drawn ``token``; ``GrammarError`` if the grammar refuses it."""
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"grammar matcher refused token {token}: {_first_line(self._matcher.get_error())}")


def _first_line(message: str) -> str:
    """llguidance's errors end in a multi-line parser dump: the line that says what failed."""
    return message.strip().splitlines()[0] if message and message.strip() else message
