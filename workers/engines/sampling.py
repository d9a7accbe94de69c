"""Token sampling shared by every engine.

Engines hand the last position's logits over as a float32 numpy vector and this
module picks the token, as ``SamplingParams`` says. Sampling in one place means
a seeded request gives the same tokens whichever engine (or node) draws each
one: the random stream for step ``i`` depends only on ``(seed, i)``, so the
prefill node can draw token 0 and the decode node tokens 1, 2, ... without
sharing generator state.

NOTE on the order of the logits processing (``TokenSampler.draw``), the same on every engine:

1. ``adjust``: the presence and frequency penalties over the tokens this
   request generated so far (OpenAI's definition: ``logit[j] -= count[j] *
   frequency_penalty + (count[j] > 0) * presence_penalty``), then ``logit_bias``
   added per token id. In float64, only when the request asks for one of them.
2. The grammar's mask, when the request has a grammar (``grammar.GrammarMatcher``):
   every token it does not allow next becomes -inf. After the bias, so that
   no bias can bring back a token the grammar forbids.
3. Logprobs, when asked for, are the log-softmax of these scores: after
   penalties, bias and mask, before temperature, top-k and top-p. So they do
   not change with temperature, a greedy request's token is always its top-1,
   and a token forced by a bias of +100 shows a logprob of about 0. After the
   mask because that is the distribution the token is actually drawn from (as
   vLLM and OpenAI's structured outputs report): a token the grammar forbids
   shows ``MIN_LOGPROB``, and a token the grammar forces shows about 0.
4. Greedy (``temperature == 0``) is the argmax of these scores; else
   temperature, top-k, top-p and a draw from ``(seed, step)``.
5. The matcher consumes the drawn token. A complete grammar allows only EOS,
   which ends the request (``grammar``'s NOTE).

``TokenSampler`` is one request's state across steps (its sampling step, its
generated-token counts, its grammar matcher); both engines and the prefill
node draw every token through it. ``draw`` is the same without a grammar.

This module imports nothing from the engines (``base`` imports it) but the
grammar module, which imports none of them either.
"""
from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from workers.engines.grammar import GrammarMatcher, GrammarTokenizer

MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # |bias| per token (OpenAI's range)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit)
MIN_LOGPROB = -9999.0  # a logprob reported for a token of probability 0 (OpenAI's convention)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy.

    ``logit_bias`` is ``((token_id, bias), ...)``; ``logprobs`` asks for the
    chosen token's logprob and ``top_logprobs`` for that many most likely
    alternatives besides (``TokenLogprobs``). ``grammar``: an llguidance
    grammar (TopLevelGrammar JSON) that every token must follow; "" for none."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str = ""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        for token, bias in self.logit_bias:
            if token < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias needs token ids >= 0 and biases in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}], got {token}: {bias}")
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError("logit_bias names a token id twice")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")

    @property
    def penalizes(self) -> bool:
        """Whether a penalty applies: drawing depends on the tokens generated so far."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a bias change the logits before sampling."""
        return self.penalizes or bool(self.logit_bias)

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy on the raw logits with nothing to report: an engine may argmax on its device."""
        return self.temperature == 0.0 and not self.adjusts_logits and not self.logprobs and not self.grammar

    @property
    def reads_history(self) -> bool:
        """Whether drawing depends on the tokens generated before: the penalties
        count them, a grammar's matcher consumes them."""
        return self.penalizes or bool(self.grammar)

    def max_token_id(self) -> int:
        """The largest token id this request names (in ``logit_bias``); -1 for none."""
        return max((token for token, _ in self.logit_bias), default=-1)


@dataclass(frozen=True)
class TokenLogprobs:
    """One drawn token's logprob and the ``top_logprobs`` most likely tokens,
    ``((token_id, logprob), ...)`` most likely first (ties: lower id first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_json(self) -> list:
        """``[token_id, logprob, [[id, logprob], ...]]``: how it travels in a KV end frame's meta."""
        return [self.token_id, self.logprob, [list(pair) for pair in self.top]]

    @classmethod
    def from_json(cls, value: object) -> TokenLogprobs:
        """The inverse of ``to_json``; ValueError for anything else."""
        try:
            token, logprob, top = value  # type: ignore[misc]
            return cls(int(token), float(logprob), tuple((int(i), float(lp)) for i, lp in top))
        except (TypeError, ValueError) as e:
            raise ValueError(f"not a TokenLogprobs in JSON: {value!r}") from e


def sample(logits: np.ndarray, params: SamplingParams, step: int,
           counts: Counter[int] | None = None) -> int:
    """Pick the token for generation step ``step`` from ``logits`` [vocab];
    ``counts``: how often the request generated each token so far (penalties)."""
    return draw(logits, params, step, counts)[0]


def draw(logits: np.ndarray, params: SamplingParams, step: int,
         counts: Counter[int] | None = None) -> tuple[int, TokenLogprobs | None]:
    """``sample``, with the drawn token's ``TokenLogprobs`` when ``params.logprobs``.
    Unconstrained only: a grammar needs a ``TokenSampler`` (its matcher)."""
    if params.grammar:
        raise ValueError("a request with a grammar draws through a TokenSampler, which holds its matcher")
    return _draw(adjust(logits, params, counts), params, step)


def _draw(scores: np.ndarray, params: SamplingParams, step: int) -> tuple[int, TokenLogprobs | None]:
    token = _pick(scores, params, step)
    return token, (token_logprobs(scores, token, params.top_logprobs) if params.logprobs else None)


def adjust(logits: np.ndarray, params: SamplingParams, counts: Counter[int] | None = None) -> np.ndarray:
    """``logits`` [vocab] after the penalties over ``counts`` and ``logit_bias``
    (float64); ``logits`` itself when the request asks for neither."""
    if not params.adjusts_logits:
        return logits
    scores = logits.astype(np.float64)  # a copy: the engine's row stays as it was
    if params.penalizes and counts:
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        times = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        scores[ids] -= times * params.frequency_penalty + (times > 0) * params.presence_penalty
    if params.logit_bias:
        ids = np.array([token for token, _ in params.logit_bias], dtype=np.int64)
        scores[ids] += np.array([bias for _, bias in params.logit_bias], dtype=np.float64)
    return scores


def token_logprobs(scores: np.ndarray, token: int, top: int) -> TokenLogprobs:
    """``token``'s logprob under ``softmax(scores)`` and the ``top`` most likely tokens'."""
    logprobs = _log_softmax(scores)
    best: list[tuple[int, float]] = []
    if top:
        ids = np.argpartition(-logprobs, min(top, logprobs.shape[0] - 1))[:top]
        ids = sorted(ids.tolist(), key=lambda i: (-logprobs[i], i))  # most likely first, ties by id
        best = [(i, float(logprobs[i])) for i in ids]
    return TokenLogprobs(token, float(logprobs[token]), tuple(best))


class TokenSampler:
    """One request's sampling across steps: its params, the sampling step of
    its last draw, the counts of the tokens it generated (the penalties read
    them) and its grammar matcher.

    ``history``: the tokens it generated before (a continued stream's, and the
    first token an engine is handed), counted and consumed by the matcher at
    once. ``grammar``: the engine's ``GrammarTokenizer``, which a request with
    a grammar needs (ValueError without it, or when the grammar or the history
    is refused, or when the model's EOS is not among its stop tokens:
    ``GrammarTokenizer.constrain``)."""

    def __init__(self, params: SamplingParams, step: int, history: Iterable[int] = (),
                 grammar: GrammarTokenizer | None = None) -> None:
        history = tuple(history)
        self.params = params
        self.step = step
        self.counts: Counter[int] = Counter(history) if params.penalizes else Counter()
        self.matcher = _matcher_of(params, history, grammar)

    def draw(self, logits: np.ndarray) -> tuple[int, TokenLogprobs | None]:
        """The next token from ``logits`` [vocab] at the next sampling step, and
        its logprobs when asked (the module's NOTE gives the order).
        ``grammar.GrammarError`` when the matcher fails (this request only)."""
        self.step += 1
        scores = adjust(logits, self.params, self.counts)
        if self.matcher is not None:
            scores = self.matcher.mask(scores)
        token, logprobs = _draw(scores, self.params, self.step)
        if self.matcher is not None:
            self.matcher.consume(token)
        if self.params.penalizes:
            self.counts[token] += 1
        return token, logprobs


def _matcher_of(params: SamplingParams, history: tuple[int, ...],
                grammar: GrammarTokenizer | None) -> GrammarMatcher | None:
    """The matcher of ``params.grammar`` after ``history``; None without a grammar."""
    if not params.grammar:
        return None
    if grammar is None:
        raise ValueError("a request with a grammar needs its engine's GrammarTokenizer")
    if grammar.constrain(params) is not params:
        raise ValueError(f"a request with a grammar needs the model's EOS {list(grammar.eos_token_ids)} among "
                         f"its stop tokens, which end it once the grammar is complete (GrammarTokenizer.constrain)")
    return grammar.matcher(params.grammar, history)


def _pick(scores: np.ndarray, params: SamplingParams, step: int) -> int:
    if params.temperature == 0.0:
        return int(np.argmax(scores))
    given, scores = scores, scores.astype(np.float64)
    if not np.isfinite(scores).all():
        # a row that overflowed (fp16) must not fail the batch it runs in: +inf wins, NaN never does
        if np.isposinf(scores).any():
            return int(np.argmax(np.isposinf(scores)))
        scores = np.where(np.isnan(scores), -np.inf, scores)
        if np.isneginf(scores).all():
            return int(np.argmax(given))
    scores = scores / params.temperature
    scores = _keep_top_k(scores, params.top_k)
    probs = _softmax(scores)
    probs = _keep_top_p(probs, params.top_p)
    rng = np.random.default_rng([_seed_of(params), step])
    return int(rng.choice(probs.shape[0], p=probs))


def _seed_of(params: SamplingParams) -> int:
    return params.seed if params.seed is not None else secrets.randbits(63)


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    """log-softmax in float64, every value in [MIN_LOGPROB, 0]: NaN counts as
    -inf, +inf as certain (its share split evenly), a row of -inf as uniform."""
    scores = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))
    if np.isposinf(scores).any():
        scores = np.where(np.isposinf(scores), 0.0, -np.inf)
    elif np.isneginf(scores).all():
        scores = np.zeros_like(scores)
    shifted = scores - np.max(scores)  # <= 0, and 0 at the maximum
    logprobs = shifted - np.log(np.sum(np.exp(shifted)))  # the sum is >= 1: every value <= 0
    return np.maximum(logprobs, MIN_LOGPROB)


def _keep_top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    if top_k <= 0 or top_k >= scores.shape[0]:
        return scores
    kth = np.partition(scores, -top_k)[-top_k]
    return np.where(scores >= kth, scores, -np.inf)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - np.max(scores))
    return shifted / shifted.sum()


def _keep_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    num_keep = int(np.searchsorted(cumulative, top_p) + 1)
    kept = np.zeros_like(probs)
    kept[order[:num_keep]] = probs[order[:num_keep]]
    return kept / kept.sum()
