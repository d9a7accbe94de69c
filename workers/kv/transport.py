"""KV data plane: one request's KV cache over one TCP connection.

The prefill node's ``KVSender`` writes ``begin``, then one ``kv`` frame per
layer slice the moment the engine emits it, then ``end`` with the first
sampled token (or ``abort`` if prefill fails). The decode node's
``KVReceiver`` reads that stream under one deadline for the whole transfer,
validates every frame against the layout it announced (and the layout the
decode side reserved for), and checks that each layer's tokens
``[layout.layer_start(layer), num_tokens)`` arrive exactly once, in any chunk
order. The sender cuts each slice to its layer's window, so an engine emits
whole chunks whatever the model's sliding windows.

The begin frame names the transfer's codec (``raw``, ``int8``, ``fp8``). A
slice the codec refuses (``UnencodableKV``: NaN or inf in it) goes raw, named
so in its frame header, and is counted in ``KVSender.raw_fallbacks``: the
receiver gets exactly what the engine computed, and no other slice or request
is touched.

Any malformed or unexpected frame raises ``FrameError`` and fails only this
transfer; the caller closes the connection. Payload bytes are never copied in
Python: the sender hands numpy buffers to ``sendmsg``, the receiver
``recv_into``s fresh numpy arrays, or a ``KVArena`` the decode side reserved
(and pre-faulted) before the transfer.
"""
from __future__ import annotations

import bisect
import contextlib
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from workers.engines.base import KVLayout, KVSlice, numpy_dtype
from workers.kv import kvcodecs
from workers.kv.codec import (
    Abort,
    Begin,
    Buffer,
    End,
    FrameError,
    FrameReader,
    KVHeader,
    encode_abort,
    encode_begin,
    encode_end,
    encode_kv,
)
from workers.kv.net import send_buffers

DEFAULT_SEND_TIMEOUT_S = 30.0

class TransferAborted(RuntimeError):
    """The sender aborted the transfer; ``reason`` says why."""

    def __init__(self, rid: str, reason: str) -> None:
        super().__init__(f"KV transfer {rid!r} aborted by sender: {reason}")
        self.rid = rid
        self.reason = reason


# ---------------------------------------------------------------- sender


class KVSender:
    """Writes one transfer to ``sock``: ``begin``, ``send_slice``*, then ``end``
    or ``abort``. Used as a context manager, an exception before ``end``
    sends ``abort`` with the exception as reason (best effort).

    ``timeout`` bounds each wait for the socket to accept more bytes."""

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_SEND_TIMEOUT_S) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.bytes_sent = 0
        self.rid: str | None = None
        self.layout: KVLayout | None = None
        self.codec = "raw"
        self.raw_fallbacks = 0  # slices the codec refused, sent raw
        self.finished = False

    def begin(self, rid: str, layout: KVLayout, meta: dict[str, Any] | None = None,
              codec: str = "raw") -> None:
        """Announce transfer ``rid`` of a cache shaped ``layout``, its slices
        encoded with ``codec``."""
        if self.rid is not None:
            raise RuntimeError(f"KVSender already began transfer {self.rid!r}")
        self._send(encode_begin(rid, layout, meta, codec))
        self.rid, self.layout, self.codec = rid, layout, codec

    def send_slice(self, kv_slice: KVSlice) -> None:
        """Send one layer's K/V for a token range, cut to the layer's window
        (nothing is sent for a slice wholly before it). Under ``raw`` the
        arrays are not copied; once this returns their bytes are in the
        kernel and they may be reused."""
        layout = self._require_open()
        _check_slice(kv_slice, layout)
        clipped = layout.clip(kv_slice)
        if clipped is None:
            return
        try:
            frame = encode_kv(self.rid, clipped, self.codec)  # type: ignore[arg-type]
        except kvcodecs.UnencodableKV:
            self.raw_fallbacks += 1
            frame = encode_kv(self.rid, clipped, "raw")  # type: ignore[arg-type]
        self._send(frame)

    def end(self, first_token: int, meta: dict[str, Any] | None = None) -> None:
        """Close the transfer with the first sampled token."""
        self._require_open()
        self._send(encode_end(self.rid, first_token, meta))  # type: ignore[arg-type]
        self.finished = True

    def abort(self, reason: str) -> None:
        """Tell the receiver this transfer will not complete."""
        self._require_open()
        self.finished = True
        self._send(encode_abort(self.rid, reason))  # type: ignore[arg-type]

    def _require_open(self) -> KVLayout:
        if self.layout is None:
            raise RuntimeError("KVSender.begin() has not been called")
        if self.finished:
            raise RuntimeError(f"KV transfer {self.rid!r} already ended or aborted")
        return self.layout

    def _send(self, buffers: list[Buffer]) -> None:
        try:
            self.bytes_sent += send_buffers(self.sock, buffers)
        except BaseException:
            self.finished = True  # a frame may be half sent: nothing more can follow it
            raise

    def __enter__(self) -> KVSender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # after a socket error the stream is unusable, and finished is already set
        if exc is not None and self.layout is not None and not self.finished:
            with contextlib.suppress(OSError):
                self.abort(f"{exc_type.__name__}: {exc}")  # type: ignore[union-attr]


def _check_slice(kv_slice: KVSlice, layout: KVLayout) -> None:
    """Catch a sender-side bug here rather than as a FrameError on the peer."""
    ntok = kv_slice.keys.shape[1] if kv_slice.keys.ndim == 3 else -1
    shape = (layout.kv_heads, ntok, layout.head_dim)
    dtype = numpy_dtype(layout.dtype)
    problems = []
    if kv_slice.dtype != layout.dtype:
        problems.append(f"dtype {kv_slice.dtype!r} != layout dtype {layout.dtype!r}")
    for name, array in (("keys", kv_slice.keys), ("values", kv_slice.values)):
        if array.shape != shape or array.dtype != dtype:
            problems.append(f"{name} {array.dtype}{list(array.shape)} != {dtype}{list(shape)}")
    if not 0 <= kv_slice.layer < layout.num_layers:
        problems.append(f"layer {kv_slice.layer} outside 0..{layout.num_layers - 1}")
    if not (kv_slice.start >= 0 and 0 < ntok <= layout.num_tokens - kv_slice.start):
        problems.append(f"tokens [{kv_slice.start}, {kv_slice.start + ntok}) "
                        f"outside [0, {layout.num_tokens})")
    if problems:
        raise ValueError("KV slice does not fit the transfer's layout: " + "; ".join(problems))


# ---------------------------------------------------------------- receiver


class KVArena:
    """Receive memory reserved in advance for one layout: exactly
    ``layout.total_bytes``, carved into C-contiguous slice arrays in arrival
    order. A complete transfer fills it exactly, since overlaps are rejected
    before their payload is read (an encoded frame is decoded into its array).

    ``prefault=True`` touches every page now, so the transfer does not pay
    for first-touch page faults. Each ``receive`` into the arena starts from
    its beginning, so slices of an earlier transfer are overwritten."""

    def __init__(self, layout: KVLayout, *, prefault: bool = True) -> None:
        self.layout = layout
        self.memory = np.empty(layout.total_bytes, np.uint8)
        if prefault:
            self.memory.fill(0)
        self._used = 0

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The next ``shape`` array of ``dtype``; an ``Allocator``."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if self._used + nbytes > len(self.memory):
            raise FrameError(
                f"KV arena for {self.layout} exhausted: {self._used} of {len(self.memory)} bytes "
                f"used, next slice needs {nbytes}"
            )
        chunk = self.memory[self._used : self._used + nbytes]
        self._used += nbytes
        return chunk.view(dtype).reshape(shape)

    def reset(self) -> None:
        """Hand the memory out again from the start."""
        self._used = 0


class TokenCoverage:
    """Which tokens of each layer have arrived. Rejects overlaps; adjacent
    ranges merge, so a complete layer is the single range
    ``[layout.layer_start(layer), num_tokens)``. Memory grows with the slices
    that arrived, not with the announced layout."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.num_layers = layout.num_layers
        self.num_tokens = layout.num_tokens
        self._ranges: dict[int, tuple[list[int], list[int]]] = {}  # layer -> (starts, ends)

    def add(self, layer: int, start: int, num_tokens: int) -> None:
        """Record tokens ``[start, start + num_tokens)`` of ``layer``."""
        end = start + num_tokens
        starts, ends = self._ranges.setdefault(layer, ([], []))
        i = bisect.bisect_right(starts, start)  # ranges before i start at or before `start`
        for j in (i - 1, i):
            if 0 <= j < len(starts) and starts[j] < end and start < ends[j]:
                raise FrameError(
                    f"kv frame layer {layer} tokens [{start}, {end}) overlap tokens "
                    f"[{starts[j]}, {ends[j]}) already received"
                )
        joins_prev = i > 0 and ends[i - 1] == start
        joins_next = i < len(starts) and starts[i] == end
        if joins_prev and joins_next:
            ends[i - 1] = ends.pop(i)
            starts.pop(i)
        elif joins_prev:
            ends[i - 1] = end
        elif joins_next:
            starts[i] = start
        else:
            starts.insert(i, start)
            ends.insert(i, end)

    def first_gap(self) -> tuple[int, int, int] | None:
        """``(layer, start, end)`` of the first missing token range, or None."""
        if self.num_tokens == 0:
            return None
        for layer in range(self.num_layers):
            starts, ends = self._ranges.get(layer, ([], []))
            position = self.layout.layer_start(layer)
            for start, end in zip(starts, ends, strict=True):
                if start > position:
                    return layer, position, start
                position = end
            if position < self.num_tokens:
                return layer, position, self.num_tokens
        return None


@dataclass
class ReceivedKV:
    """A completed transfer. Times are ``time.monotonic()`` on the receiver;
    ``last_byte_at`` is None when the layout has no tokens."""

    rid: str
    layout: KVLayout
    slices: list[KVSlice]  # arrival order
    first_token: int
    meta: dict[str, Any] | None
    bytes_received: int
    first_byte_at: float
    last_byte_at: float | None
    begin_meta: dict[str, Any] | None = None
    codec: str = "raw"


class KVReceiver:
    """Reads one transfer per connection. ``on_slice`` (optional) is called
    with each slice as soon as it is validated, in arrival order."""

    def __init__(self, on_slice: Callable[[KVSlice], None] | None = None) -> None:
        self.on_slice = on_slice

    def receive(
        self, sock: socket.socket, *, expect_rid: str | None = None,
        expected_layout: KVLayout | None = None, timeout: float, arena: KVArena | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> ReceivedKV:
        """Read ``begin``, kv frames and ``end`` within ``timeout`` seconds in all;
        ``on_bytes(n)`` (optional) hears of every read that got ``n`` bytes.

        Slices are received into ``arena`` when given (its layout is then the
        expected one; it is reset first), else into fresh arrays. Raises
        ``FrameError`` for anything malformed or unexpected (``FrameTimeout``
        when the deadline passes), ``TransferAborted`` when the sender aborts.
        Does not close ``sock``."""
        deadline = time.monotonic() + timeout
        if arena is not None:
            if expected_layout not in (None, arena.layout):
                raise ValueError(f"arena layout {arena.layout} != expected {expected_layout}")
            expected_layout = arena.layout
            arena.reset()
        allocate = np.empty if arena is None else arena.allocate
        reader = FrameReader(sock, on_bytes=on_bytes)
        begin = self._read_begin(reader, expect_rid, expected_layout, deadline)
        coverage = TokenCoverage(begin.layout)
        slices: list[KVSlice] = []
        last_kv_at: float | None = None
        while True:
            header = reader.read_header(rid=begin.rid, layout=begin.layout, deadline=deadline,
                                        codec=begin.codec)
            if isinstance(header, KVHeader):
                coverage.add(header.layer, header.start, header.num_tokens)
                kv_slice = reader.read_payload(header, deadline=deadline, allocate=allocate)
                last_kv_at = reader.last_frame_at
                slices.append(kv_slice)
                if self.on_slice is not None:
                    self.on_slice(kv_slice)
            elif isinstance(header, End):
                _check_complete(coverage)
                return ReceivedKV(
                    begin.rid, begin.layout, slices, header.first_token, header.meta,
                    reader.bytes_received, reader.first_byte_at, last_kv_at,  # type: ignore[arg-type]
                    begin_meta=begin.meta, codec=begin.codec,
                )
            elif isinstance(header, Abort):
                raise TransferAborted(header.rid, header.reason)
            else:
                raise FrameError(f"second begin frame in transfer {begin.rid!r}")

    @staticmethod
    def _read_begin(
        reader: FrameReader, expect_rid: str | None, expected_layout: KVLayout | None,
        deadline: float,
    ) -> Begin:
        frame = reader.read_frame(rid=expect_rid, layout=None, deadline=deadline)
        if isinstance(frame, Abort):
            raise TransferAborted(frame.rid, frame.reason)
        if not isinstance(frame, Begin):
            kind = "end" if isinstance(frame, End) else type(frame).__name__
            raise FrameError(f"expected a begin frame first, got {kind}")
        if expected_layout is not None and frame.layout != expected_layout:
            raise FrameError(
                f"begin header field 'layout': expected {expected_layout}, got {frame.layout}"
            )
        return frame


def _check_complete(coverage: TokenCoverage) -> None:
    gap = coverage.first_gap()
    if gap is not None:
        layer, start, end = gap
        raise FrameError(
            f"end frame before full coverage: layer {layer} is missing tokens [{start}, {end})"
        )
