"""Validate OpenAI request bodies into ``ParsedRequest``; bad input -> ``APIError`` (400)."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from aiohttp import web

from scheduler.request import KV_CODEC_MODES, PLACEMENT_MODES

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``: OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        """The error as an HTTP response (with ``headers``, e.g. ``Retry-After``)."""
        return web.json_response(self.body(), status=self.status, headers=self.headers)


@dataclass(frozen=True)
class ParsedRequest:
    """A chat or text completion request, checked field by field."""

    model: str
    messages: list[dict] | None  # chat
    prompt: str  # text completion
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    placement: str | None
    ignore_eos: bool
    kv_codec: str | None = None  # pdcluster.kv_codec: the KV codec hint (None: the server's --kv-codec)


def parse_body(body: object, *, chat: bool) -> ParsedRequest:
    """Check every field we use; unknown OpenAI fields are ignored like the API does."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required and must be a string", param="model")
    messages = _messages(body) if chat else None
    prompt = "" if chat else _prompt(body)
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return ParsedRequest(
        model=model, messages=messages, prompt=prompt,
        max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 20, integer=True)),
        seed=_seed(body),
        stop=_stop(body),
        stream=_bool(body, "stream"),
        include_usage=bool(stream_options.get("include_usage", False)),
        placement=_placement(body),
        ignore_eos=_bool(body, "ignore_eos"),
        kv_codec=_kv_codec(body),
    )


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(content: object, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise APIError(400, f"messages[{i}].content must be a string or an array of text parts", param=f"messages[{i}].content")


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
    return prompt


def _max_tokens(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise APIError(400, f"'{name}' must be an integer >= 1", param=name)
        return value
    return None


def _number(body: dict, name: str, default: float, low: float, high: float,
            *, open_low: bool = False, integer: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value > high or value < low or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise APIError(400, f"'{name}' must be a {'integer' if integer else 'number'} in {bound}", param=name)
    return value


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise APIError(400, "'seed' must be an integer", param="seed")
    return seed % (1 << 63)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"'stop' must be a string or up to {MAX_STOP_STRINGS} strings", param="stop")
    return tuple(stop)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean", param=name)
    return value


def _extension(body: dict) -> dict:
    """The body's ``pdcluster`` object ({} when absent)."""
    ext = body.get("pdcluster")
    if ext is None:
        return {}
    if not isinstance(ext, dict):
        raise APIError(400, "'pdcluster' must be an object", param="pdcluster")
    return ext


def _kv_codec(body: dict) -> str | None:
    """``pdcluster.kv_codec``: the codec of this request's KV transfer if it has one
    (auto, raw, int8, fp8); it overrides the server's ``--kv-codec``."""
    codec = _extension(body).get("kv_codec")
    if codec is not None and codec not in KV_CODEC_MODES:
        raise APIError(400, f"'pdcluster.kv_codec' must be one of {list(KV_CODEC_MODES)}", param="pdcluster.kv_codec")
    return codec


def _placement(body: dict) -> str | None:
    placement = _extension(body).get("placement")
    if placement is not None and placement not in PLACEMENT_MODES:
        raise APIError(400, f"'pdcluster.placement' must be one of {list(PLACEMENT_MODES)}", param="pdcluster.placement")
    return placement


# ---------------------------------------------------------------- other API dialects (docs/api.md)


def refuse_unsupported(body: dict, supported: Collection[str], reasons: Mapping[str, str], *,
                       where: str = "") -> None:
    """400 naming the first field of ``body`` outside ``supported`` that is set (not null, "", [] or {}).

    The Ollama, Anthropic and Responses routes accept only what they honour;
    ``reasons`` says why a known field is refused, ``where`` prefixes the name
    (``"options."``)."""
    for name, value in body.items():
        if name in supported or value is None or value in ("", [], {}):
            continue
        why = reasons.get(name, "pdcluster does not support it")
        raise APIError(400, f"'{where}{name}' is not supported: {why}", param=f"{where}{name}")


def parse_translated(body: dict, names: Mapping[str, str], *, chat: bool = True) -> ParsedRequest:
    """``parse_body`` for a body another dialect translated into the chat-completions shape;
    an error names the client's own field (``names``: chat-completions field -> the dialect's)."""
    try:
        return parse_body(body, chat=chat)
    except APIError as e:
        name = names.get(e.param or "")
        if name is None:
            raise
        raise APIError(e.status, e.message.replace(f"'{e.param}'", f"'{name}'"), e.type, name, e.code,
                       e.headers) from None
