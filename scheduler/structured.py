"""Structured output: ``response_format`` and forced tool calls as grammars for constrained decoding.

Why llguidance: the mask must be applied where the token is drawn, and that
is on the prefill node for token 0 and on the decode node for the rest, on
torch and on MLX. llguidance computes a token mask on the CPU from the
tokenizer alone (about 0.1 ms per token on the tiny model), with no tie to
either framework, so both engines apply the same mask to their logits
(workers/engines/sampling.py). It compiles JSON schemas and lark grammars
lazily (no per-schema compile step of seconds, as xgrammar's or outlines'
FSM builds have), ships abi3 wheels for Linux and macOS, and a grammar
travels as one JSON string in ``SamplingParams.grammar``.

The scheduler compiles and checks every grammar against the model's tokenizer
before it places the request, so a bad schema is a 400 naming the field,
never a failure on a worker mid-request.
"""
from __future__ import annotations

import json

import llguidance

from scheduler.tools import COMPACT_JSON

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
JSON_SCHEMA_FIELDS = frozenset({"name", "schema", "strict"})  # "description" would need a prompt to go in


class GrammarError(ValueError):
    """A schema or grammar that cannot constrain decoding (the message says why)."""


def response_format_grammar(response_format: dict) -> str | None:
    """The grammar for an OpenAI ``response_format`` (None for ``text``); ``GrammarError`` if malformed.

    ``json_object``: any JSON object. ``json_schema``: an instance of
    ``json_schema.schema``, generated compactly (no free whitespace, which a
    model could otherwise repeat until ``max_tokens``)."""
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise GrammarError(f"'type' must be one of {list(RESPONSE_FORMATS)}, got {kind!r}")
    extra = sorted(set(response_format) - {"type", "json_schema"})
    if extra:
        raise GrammarError(f"unknown field {extra[0]!r}")
    if kind == "text":
        if "json_schema" in response_format:
            raise GrammarError("'json_schema' goes with type 'json_schema'")
        return None
    if kind == "json_object":
        if "json_schema" in response_format:
            raise GrammarError("'json_schema' goes with type 'json_schema'")
        return json_schema_grammar({"type": "object"})
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise GrammarError("type 'json_schema' needs 'json_schema': {\"name\": ..., \"schema\": {...}}")
    unknown = sorted(set(spec) - JSON_SCHEMA_FIELDS)
    if unknown == ["description"]:
        raise GrammarError("'json_schema.description' is not supported: it is not shown to the model "
                           "(describe the answer in the messages)")
    if unknown:
        raise GrammarError(f"unknown field 'json_schema.{unknown[0]}'")
    if "strict" in spec and not isinstance(spec["strict"], bool):
        raise GrammarError("'json_schema.strict' must be a boolean")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise GrammarError("'json_schema.schema' must be a JSON schema object")
    # strict or not, the output follows the schema: constrained decoding cannot be half-on
    return json_schema_grammar(schema)


def json_schema_grammar(schema: dict) -> str:
    """llguidance's grammar for instances of ``schema`` (compact JSON unless the schema says otherwise)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT_JSON)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"not a usable JSON schema: {e}") from None


def lark_grammar(lark: str) -> str:
    """llguidance's grammar for lark text (``scheduler/tools.py``'s forced tool calls)."""
    try:
        return llguidance.LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"grammar: {e}") from None


def check_grammar(grammar: str, tokenizer: llguidance.LLTokenizer) -> None:
    """``GrammarError`` unless ``grammar`` compiles for ``tokenizer`` (unsupported schema keywords,
    unsatisfiable constraints, bad references...)."""
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise GrammarError(error)
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
