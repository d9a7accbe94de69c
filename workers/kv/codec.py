"""KV data-plane frames: encode for ``socket.sendmsg``, decode and validate.

A frame is::

    prefix   4s magic b"PDKV" | B version | I header length   (big-endian, 9 bytes)
    header   msgpack map, always with "kind": "begin" | "kv" | "end" | "abort"
    payload  kv frames only: raw key bytes, then raw value bytes

A transfer is ``begin, kv*, end`` (or an ``abort`` anywhere) for one request
id. The begin frame names the transfer's codec (``workers/kv/kvcodecs.py``:
``raw``, ``int8`` or ``fp8``). Each kv frame carries one layer's K and V for
tokens ``[start, start + ntok)`` and names its own codec: the transfer's, or
``raw`` for a slice the codec cannot encode (non-finite values). Under
``raw`` the payload is keys then values, each C-contiguous ``[kv_heads, ntok,
head_dim]`` in the layout's wire dtype (bf16 as uint16 bit patterns); under
another codec it is ``EncodedSlice.buffers()`` (scales, then codes), ``klen``
and ``vlen`` counting the keys' and the values' share. An xxh3_64 checksum
covers the payload bytes as sent (streamed buffer by buffer on send, one pass
over the contiguous payload on receive: the same digest). The receiver decodes
to the wire dtype at its edge, so what it hands on is the same ``KVSlice``
whatever the codec.

A sliding-window layer (``KVLayout.windows``) carries only its last
``window`` tokens: its frames start at ``layout.layer_start(layer)``.

Decoding trusts nothing: every header field is checked against the request id
and the ``KVLayout`` the caller expects, and any mismatch raises
``FrameError`` naming the field, what was expected and what arrived. A frame
either decodes into exactly the slice the sender sent or it raises.
"""
from __future__ import annotations

import math
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import numpy as np
import xxhash

from workers.engines.base import KVLayout, KVSlice, numpy_dtype
from workers.kv import kvcodecs

MAGIC = b"PDKV"
VERSION = 1
PREFIX = struct.Struct(">4sBI")  # magic, version, header length
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 1 << 30  # keys + values of one frame
# Receive in pieces of this size, as the raw-socket baseline does: on
# loopback larger recvs leave both sides idle more (docs/performance.md).
RECV_BYTES = 64 << 10
TIMEOUT_SLACK_S = 0.05
CODECS: tuple[str, ...] = tuple(kvcodecs.CODECS)  # raw, int8, fp8

Buffer = bytes | bytearray | memoryview
# (shape, dtype) -> a fresh C-contiguous array to receive into, like np.empty
Allocator = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class FrameError(ValueError):
    """A frame (or the stream carrying it) is malformed, truncated or unexpected."""


class FrameTimeout(FrameError, TimeoutError):
    """The deadline passed while waiting for frame bytes."""


@dataclass(frozen=True)
class Begin:
    """Opens a transfer: which request, the shape of its whole cache, and the
    codec its kv frames use (each may fall back to ``raw``)."""

    rid: str
    layout: KVLayout
    meta: dict[str, Any] | None = None
    codec: str = "raw"


@dataclass(frozen=True)
class End:
    """Closes a transfer: the first sampled token, plus optional timings."""

    rid: str
    first_token: int
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class Abort:
    """The sender gave up on the transfer."""

    rid: str
    reason: str


Frame = Begin | KVSlice | End | Abort


# ---------------------------------------------------------------- encoding


def pack_frame(header: dict[str, Any], *payloads: Buffer) -> list[Buffer]:
    """Prefix + msgpack ``header`` as one bytes, then ``payloads`` untouched.

    Low level: does not check the header. Use the ``encode_*`` functions."""
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header is {len(packed)} bytes; the limit is {MAX_HEADER_BYTES}")
    return [PREFIX.pack(MAGIC, VERSION, len(packed)) + packed, *payloads]


def encode_begin(rid: str, layout: KVLayout, meta: dict[str, Any] | None = None,
                 codec: str = "raw") -> list[Buffer]:
    """The frame that opens transfer ``rid`` of a cache shaped ``layout``,
    its kv frames encoded with ``codec``."""
    kvcodecs.check_codec(codec)
    header: dict[str, Any] = {"kind": "begin", "rid": rid, "layout": _layout_to_wire(layout), "codec": codec}
    if meta is not None:
        header["meta"] = meta
    return pack_frame(header)


def encode_kv(rid: str, kv_slice: KVSlice, codec: str = "raw") -> list[Buffer]:
    """Header bytes plus the payload: zero-copy views of the slice's keys and
    values under ``raw``, the encoded buffers under another codec.

    Raises ``kvcodecs.UnencodableKV`` when ``codec`` cannot encode the slice
    (non-finite values); ``raw`` always can."""
    checksum = None
    if codec == "raw":
        keys = _byte_view(kv_slice.keys)
        values = _byte_view(kv_slice.values)
        payloads: list[Buffer] = [keys, values]
        klen, vlen = len(keys), len(values)
        checksum = kv_slice.checksum  # taken where the slice was produced, if it was
    else:
        encoded = kvcodecs.encode_slice(codec, kv_slice)
        payloads = list(encoded.buffers())
        klen = vlen = kvcodecs.check_codec(codec).spec(encoded.shape, encoded.dtype).nbytes(encoded.shape)
    if checksum is None:
        checksum = _digest(payloads)
    header = {
        "kind": "kv",
        "rid": rid,
        "layer": kv_slice.layer,
        "start": kv_slice.start,
        "ntok": kv_slice.num_tokens,
        "dtype": kv_slice.dtype,
        "shape": list(kv_slice.keys.shape),
        "codec": codec,
        "klen": klen,
        "vlen": vlen,
        "checksum": checksum,
    }
    return pack_frame(header, *payloads)


def slice_digest(kv_slice: KVSlice) -> KVSlice:
    """``kv_slice`` with its ``checksum`` set: the digest its raw kv frame
    carries. Call it where the slice is produced, while its bytes are hot."""
    if kv_slice.checksum is not None:
        return kv_slice
    return replace(kv_slice, checksum=_digest([_byte_view(kv_slice.keys), _byte_view(kv_slice.values)]))


def _digest(buffers: list[Buffer]) -> int:
    hasher = xxhash.xxh3_64()
    for buffer in buffers:
        hasher.update(buffer)
    return hasher.intdigest()


def encode_end(rid: str, first_token: int, meta: dict[str, Any] | None = None) -> list[Buffer]:
    """The frame that closes transfer ``rid`` with the first sampled token."""
    header: dict[str, Any] = {"kind": "end", "rid": rid, "first_token": first_token}
    if meta is not None:
        header["meta"] = meta
    return pack_frame(header)


def encode_abort(rid: str, reason: str) -> list[Buffer]:
    """The frame that tells the receiver transfer ``rid`` will not complete."""
    return pack_frame({"kind": "abort", "rid": rid, "reason": reason})


def _layout_to_wire(layout: KVLayout) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "num_layers": layout.num_layers,
        "kv_heads": layout.kv_heads,
        "head_dim": layout.head_dim,
        "dtype": layout.dtype,
        "num_tokens": layout.num_tokens,
    }
    if layout.windows:
        wire["windows"] = list(layout.windows)
    return wire


def _byte_view(array: np.ndarray) -> memoryview:
    """A flat byte view of ``array``; copies only if it is not C-contiguous."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


# ---------------------------------------------------------------- header schema

_INT = (int,)
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "begin": {"rid": str, "layout": dict, "meta": dict, "codec": str},
    "kv": {
        "rid": str, "layer": _INT, "start": _INT, "ntok": _INT, "dtype": str, "shape": list,
        "codec": str, "klen": _INT, "vlen": _INT, "checksum": _INT,
    },
    "end": {"rid": str, "first_token": _INT, "meta": dict},
    "abort": {"rid": str, "reason": str},
}
# fields a header may omit, per where they appear; a begin without "codec" is raw (older senders)
_OPTIONAL: dict[str, set[str]] = {"begin": {"meta", "codec"}, "end": {"meta"}, "begin header layout": {"windows"}}
_LAYOUT_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "num_layers": _INT, "kv_heads": _INT, "head_dim": _INT, "dtype": str, "num_tokens": _INT,
    "windows": list,
}


@dataclass(frozen=True)
class KVHeader:
    """A validated kv header; the payload is still to be read and checked."""

    layer: int
    start: int
    shape: tuple[int, int, int]  # [kv_heads, ntok, head_dim]
    dtype: str
    klen: int
    vlen: int
    checksum: int
    codec: str = "raw"

    @property
    def num_tokens(self) -> int:
        return self.shape[1]


def _mismatch(where: str, field: str, expected: object, got: object) -> FrameError:
    return FrameError(f"{where} field {field!r}: expected {expected}, got {got!r}")


def _check_fields(where: str, fields: dict[Any, Any], schema: dict[str, Any], optional: frozenset[str] | set[str] = frozenset()
                  ) -> None:
    for name in fields:
        if name not in schema and name != "kind":
            raise FrameError(f"{where}: unexpected field {name!r}")
    for name, types in schema.items():
        if name not in fields:
            if name in optional:
                continue
            raise FrameError(f"{where}: missing field {name!r}")
        value = fields[name]
        # bool is an int subclass; a bool is never a valid count or index
        if not isinstance(value, types) or isinstance(value, bool):
            type_names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise _mismatch(where, name, type_names, value)


def _parse_prefix(prefix: Buffer) -> int:
    """Check magic and version of a 9-byte prefix; return the header length."""
    magic, version, header_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise _mismatch("frame prefix", "magic", MAGIC, bytes(magic))
    if version != VERSION:
        raise _mismatch("frame prefix", "version", VERSION, version)
    if not 0 < header_len <= MAX_HEADER_BYTES:
        raise _mismatch("frame prefix", "header length", f"1..{MAX_HEADER_BYTES}", header_len)
    return header_len


def _parse_header(
    data: Buffer, *, rid: str | None, layout: KVLayout | None, codec: str = "raw"
) -> Begin | End | Abort | KVHeader:
    """Unpack and validate a msgpack header against ``rid``, ``layout`` and
    the transfer's ``codec`` (a kv frame may use it or ``raw``).

    ``rid=None`` accepts any request id. ``layout=None`` means no begin frame
    has been seen yet, so a kv frame is an error."""
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"frame header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError(f"frame header: expected a msgpack map, got {type(header).__name__}")
    kind = header.get("kind")
    if kind not in _SCHEMA:
        raise _mismatch("frame header", "kind", "/".join(_SCHEMA), kind)
    where = f"{kind} header"
    _check_fields(where, header, _SCHEMA[kind], _OPTIONAL.get(kind, set()))
    if rid is not None and header["rid"] != rid:
        raise _mismatch(where, "rid", repr(rid), header["rid"])
    if kind == "begin":
        codec = header.get("codec", "raw")
        if codec not in CODECS:
            raise FrameError(f"begin header field 'codec': expected one of {'/'.join(CODECS)} (the codecs "
                             f"this node decodes), got {codec!r}")
        return Begin(header["rid"], _parse_layout(header["layout"]), header.get("meta"), codec)
    if kind == "end":
        if header["first_token"] < 0:
            raise _mismatch(where, "first_token", ">= 0", header["first_token"])
        return End(header["rid"], header["first_token"], header.get("meta"))
    if kind == "abort":
        return Abort(header["rid"], header["reason"])
    if layout is None:
        raise FrameError(f"kv frame for {header['rid']!r} arrived before its begin frame")
    return _parse_kv_header(header, layout, codec)


def _parse_layout(fields: dict[Any, Any]) -> KVLayout:
    _check_fields("begin header layout", fields, _LAYOUT_SCHEMA, _OPTIONAL["begin header layout"])
    windows = fields.get("windows", [])
    if not all(type(w) is int for w in windows):
        raise _mismatch("begin header layout", "windows", "a list of ints", windows)
    try:
        return KVLayout(**{**fields, "windows": tuple(windows)})
    except ValueError as exc:
        raise FrameError(f"begin header field 'layout': {exc}") from None


def _parse_kv_header(h: dict[str, Any], layout: KVLayout, codec: str = "raw") -> KVHeader:
    where = "kv header"
    allowed_codecs = sorted({"raw", codec})
    if h["codec"] not in allowed_codecs:
        raise _mismatch(where, "codec", f"{'/'.join(allowed_codecs)} (the begin frame named {codec!r})",
                        h["codec"])
    if not 0 <= h["layer"] < layout.num_layers:
        raise _mismatch(where, "layer", f"0..{layout.num_layers - 1}", h["layer"])
    first = layout.layer_start(h["layer"])
    if not first <= h["start"] < layout.num_tokens:
        if not layout.num_tokens:
            allowed = "none (the layout has 0 tokens)"
        elif first:
            allowed = f"{first}..{layout.num_tokens - 1} (layer {h['layer']} ships its last {layout.window(h['layer'])} tokens)"
        else:
            allowed = f"0..{layout.num_tokens - 1}"
        raise _mismatch(where, "start", allowed, h["start"])
    room = layout.num_tokens - h["start"]
    if not 0 < h["ntok"] <= room:
        raise _mismatch(where, "ntok", f"1..{room} (start {h['start']}, num_tokens "
                        f"{layout.num_tokens})", h["ntok"])
    if h["dtype"] != layout.dtype:
        raise _mismatch(where, "dtype", repr(layout.dtype), h["dtype"])
    shape = (layout.kv_heads, h["ntok"], layout.head_dim)
    if h["shape"] != list(shape) or not all(type(d) is int for d in h["shape"]):
        raise _mismatch(where, "shape", list(shape), h["shape"])
    if 2 * math.prod(shape) * numpy_dtype(layout.dtype).itemsize > MAX_PAYLOAD_BYTES:
        raise FrameError(f"kv frame of {list(shape)} {layout.dtype} is over the {MAX_PAYLOAD_BYTES}-byte "
                         f"payload limit")
    nbytes = kvcodecs.check_codec(h["codec"]).spec(shape, layout.dtype).nbytes(shape)
    for field in ("klen", "vlen"):
        if h[field] != nbytes:
            raise _mismatch(where, field, f"{nbytes} ({h['codec']})", h[field])
    return KVHeader(h["layer"], h["start"], shape, layout.dtype, nbytes, nbytes, h["checksum"], h["codec"])


def _check_checksum(header: KVHeader, payload: Buffer) -> None:
    got = xxhash.xxh3_64_intdigest(payload)  # equals streaming update() over the sent buffers
    if got != header.checksum:
        raise FrameError(
            f"kv header field 'checksum': expected {header.checksum} (sender's), got {got} for the "
            f"payload of layer {header.layer} tokens [{header.start}, {header.start + header.num_tokens})"
        )


def _finish_kv(header: KVHeader, payload: Buffer) -> KVSlice:
    """Verify the checksum of a raw kv frame's contiguous payload (keys then
    values) and build its slice from the payload's two halves."""
    _check_checksum(header, payload)
    # [2, kv_heads, ntok, head_dim]: keys, values
    kv = np.frombuffer(payload, numpy_dtype(header.dtype)).reshape((2, *header.shape))
    return KVSlice(header.layer, header.start, kv[0], kv[1], header.dtype)


def _finish_encoded(header: KVHeader, payload: Buffer, out: np.ndarray) -> KVSlice:
    """Verify an encoded kv frame's checksum, decode it to the wire dtype
    into ``out`` (``[2, kv_heads, ntok, head_dim]``) and slice that."""
    _check_checksum(header, payload)
    try:
        encoded = kvcodecs.EncodedSlice.from_buffer(header.codec, header.dtype, header.shape, payload)
        keys, values = kvcodecs.decode(encoded)
    except ValueError as exc:  # scales or codes the encoder never writes
        raise FrameError(f"kv frame of layer {header.layer} does not decode as {header.codec}: {exc}") from None
    out[0], out[1] = keys, values
    return KVSlice(header.layer, header.start, out[0], out[1], header.dtype)


# ---------------------------------------------------------------- decoding from bytes


def decode_frame(data: Buffer, *, rid: str | None = None, layout: KVLayout | None = None,
                 codec: str = "raw") -> Frame:
    """Decode ``data``, which must hold exactly one frame (a kv frame of a
    transfer whose begin named ``codec``).

    A raw kv frame's arrays are read-only views into ``data`` (no copy); an
    encoded one is decoded into fresh arrays."""
    view = memoryview(data).cast("B")
    if len(view) < PREFIX.size:
        raise FrameError(f"truncated frame: {len(view)} bytes, the prefix alone is {PREFIX.size}")
    header_end = PREFIX.size + _parse_prefix(view[: PREFIX.size])
    if len(view) < header_end:
        raise FrameError(f"truncated frame: {len(view)} bytes, prefix and header need {header_end}")
    header = _parse_header(view[PREFIX.size : header_end], rid=rid, layout=layout, codec=codec)
    if not isinstance(header, KVHeader):
        _expect_length(len(view), header_end)
        return header
    frame_end = header_end + header.klen + header.vlen
    _expect_length(len(view), frame_end)
    if header.codec == "raw":
        return _finish_kv(header, view[header_end:frame_end])
    return _finish_encoded(header, view[header_end:frame_end],
                           np.empty((2, *header.shape), numpy_dtype(header.dtype)))


def _expect_length(got: int, expected: int) -> None:
    if got < expected:
        raise FrameError(f"truncated frame: {got} bytes, expected {expected}")
    if got > expected:
        raise FrameError(f"frame has {got - expected} trailing bytes after its {expected}")


# ---------------------------------------------------------------- decoding from a socket


class FrameReader:
    """Reads frames off a socket with ``recv_into`` straight into their final
    buffers, under a caller-given ``time.monotonic()`` deadline.

    Tracks ``bytes_received``, ``first_byte_at`` (first byte of the stream)
    and ``last_frame_at`` (last byte of the latest frame). ``on_bytes``, when
    given, is called with the count after every read that got bytes (the KV
    listener restarts its lease's silence with it)."""

    def __init__(self, sock: socket.socket, on_bytes: Callable[[int], None] | None = None) -> None:
        self.sock = sock
        self.on_bytes = on_bytes
        self.bytes_received = 0
        self.first_byte_at: float | None = None
        self.last_frame_at: float | None = None
        self._prefix = bytearray(PREFIX.size)
        self._scratch = bytearray()  # encoded payloads land here before decoding

    def read_frame(
        self, *, rid: str | None, layout: KVLayout | None, deadline: float,
        allocate: Allocator = np.empty, codec: str = "raw",
    ) -> Frame:
        """Read and validate one whole frame; raise ``FrameError`` on anything
        wrong, ``FrameTimeout`` if ``deadline`` passes first."""
        header = self.read_header(rid=rid, layout=layout, deadline=deadline, codec=codec)
        if isinstance(header, KVHeader):
            return self.read_payload(header, deadline=deadline, allocate=allocate)
        return header

    def read_header(
        self, *, rid: str | None, layout: KVLayout | None, deadline: float, codec: str = "raw",
    ) -> Begin | End | Abort | KVHeader:
        """Read and validate a frame's prefix and header (a kv frame against
        the transfer's ``codec``). After a ``KVHeader`` the caller must
        ``read_payload`` before the next frame."""
        self._recv_exactly(memoryview(self._prefix), deadline, "frame prefix", frame_start=True)
        header_buf = bytearray(_parse_prefix(self._prefix))
        self._recv_exactly(memoryview(header_buf), deadline, "frame header")
        header = _parse_header(header_buf, rid=rid, layout=layout, codec=codec)
        if not isinstance(header, KVHeader):
            self.last_frame_at = time.monotonic()
        return header

    def read_payload(
        self, header: KVHeader, *, deadline: float, allocate: Allocator = np.empty
    ) -> KVSlice:
        """Receive a kv frame into one array from ``allocate``
        (``[2, kv_heads, ntok, head_dim]``, keys then values) and verify its
        checksum; the slice's arrays are its halves. An encoded frame is
        received into a scratch buffer reused frame to frame and decoded into
        that array, so the memory a transfer holds is the same for any codec."""
        payload = allocate((2, *header.shape), numpy_dtype(header.dtype))
        if header.codec == "raw":
            view = memoryview(payload).cast("B")
            self._recv_exactly(view, deadline, "kv payload")
            self.last_frame_at = time.monotonic()
            return _finish_kv(header, view)
        size = header.klen + header.vlen
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        view = memoryview(self._scratch)[:size]
        self._recv_exactly(view, deadline, "kv payload")
        self.last_frame_at = time.monotonic()
        return _finish_encoded(header, view, payload)

    def _recv_exactly(
        self, view: memoryview, deadline: float, what: str, frame_start: bool = False
    ) -> None:
        """Fill ``view``, at most ``RECV_BYTES`` per ``recv_into``. The socket
        timeout is what is left of ``deadline``, refreshed once it is
        ``TIMEOUT_SLACK_S`` stale (each ``settimeout`` is a syscall), so a
        wait can overrun the deadline by that much at most."""
        got = 0
        set_at = -math.inf
        while got < len(view):
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise self._timeout(what, got, len(view))
            if now - set_at > TIMEOUT_SLACK_S:
                self.sock.settimeout(remaining)
                set_at = now
            try:
                n = self.sock.recv_into(view[got : got + RECV_BYTES])
            except TimeoutError:  # socket.timeout
                raise self._timeout(what, got, len(view)) from None
            except ConnectionError as exc:
                raise FrameError(f"connection lost while reading {what}: {exc}") from exc
            if n == 0:
                if frame_start and got == 0:
                    raise FrameError("connection closed before the transfer's end frame")
                raise FrameError(
                    f"truncated frame: connection closed after {got} of {len(view)} bytes of {what}"
                )
            if self.first_byte_at is None:
                self.first_byte_at = time.monotonic()
            got += n
            self.bytes_received += n
            if self.on_bytes is not None:
                self.on_bytes(n)

    @staticmethod
    def _timeout(what: str, got: int, total: int) -> FrameTimeout:
        return FrameTimeout(f"deadline passed waiting for {what} ({got} of {total} bytes received)")
