"""KV frames decode into exactly what was encoded, or raise FrameError naming why."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import xxhash
from conftest import RID, assert_same_slice, chunked_layouts, frame_bytes, random_slice
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engines.base import KVLayout, KVSlice
from workers.kv.codec import (
    MAX_HEADER_BYTES,
    PREFIX,
    Abort,
    Begin,
    End,
    FrameError,
    FrameReader,
    FrameTimeout,
    decode_frame,
    encode_abort,
    encode_begin,
    encode_end,
    encode_kv,
    pack_frame,
)

LAYOUT = KVLayout(num_layers=3, kv_heads=2, head_dim=4, dtype="float16", num_tokens=10)


# ---------------------------------------------------------------- round trips


@given(chunked_layouts())
@settings(deadline=None)
def test_kv_frames_round_trip_bit_exact_for_every_dtype_and_chunking(case) -> None:
    layout, chunks, seed = case
    rng = np.random.default_rng(seed)
    for layer in range(layout.num_layers):
        for start, ntok in chunks:
            sent = random_slice(rng, layout, layer, start, ntok)
            got = decode_frame(frame_bytes(encode_kv(RID, sent)), rid=RID, layout=layout)
            assert isinstance(got, KVSlice)
            assert_same_slice(got, sent)


META_VALUES = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=8))


@given(
    meta=st.dictionaries(st.text(max_size=8), META_VALUES, max_size=4),
    first_token=st.integers(0, 2**31),
    reason=st.text(max_size=40),
)
def test_control_frames_round_trip(meta: dict, first_token: int, reason: str) -> None:
    assert decode_frame(frame_bytes(encode_begin(RID, LAYOUT, meta)), rid=RID) == Begin(RID, LAYOUT, meta)
    assert decode_frame(frame_bytes(encode_begin(RID, LAYOUT))) == Begin(RID, LAYOUT, None)
    assert decode_frame(frame_bytes(encode_end(RID, first_token, meta)), rid=RID) == End(RID, first_token, meta)
    assert decode_frame(frame_bytes(encode_abort(RID, reason)), rid=RID) == Abort(RID, reason)


def test_encode_kv_hands_out_views_of_contiguous_arrays_not_copies() -> None:
    sent = random_slice(np.random.default_rng(0), LAYOUT, 0, 0, 5)
    _, keys_buf, values_buf = encode_kv(RID, sent)
    assert isinstance(keys_buf, memoryview) and isinstance(values_buf, memoryview)
    assert np.shares_memory(np.asarray(keys_buf), sent.keys)
    assert np.shares_memory(np.asarray(values_buf), sent.values)


def test_encode_kv_makes_non_contiguous_arrays_contiguous_and_round_trips() -> None:
    rng = np.random.default_rng(1)
    whole = random_slice(rng, LAYOUT, 1, 0, 10)
    # [kv_heads, 10, head_dim] -> every other token: [kv_heads, 5, head_dim], strided
    strided = KVSlice(1, 0, whole.keys[:, ::2], whole.values[:, ::2], LAYOUT.dtype)
    assert not strided.keys.flags.c_contiguous
    got = decode_frame(frame_bytes(encode_kv(RID, strided)), rid=RID, layout=LAYOUT)
    assert got.keys.tobytes() == np.ascontiguousarray(strided.keys).tobytes()
    assert got.values.tobytes() == np.ascontiguousarray(strided.values).tobytes()


def test_checksum_is_xxh3_64_of_key_bytes_then_value_bytes() -> None:
    sent = random_slice(np.random.default_rng(2), LAYOUT, 2, 3, 4)
    header = msgpack.unpackb(encode_kv(RID, sent)[0][PREFIX.size :])
    assert header["checksum"] == xxhash.xxh3_64_intdigest(sent.keys.tobytes() + sent.values.tobytes())


# ---------------------------------------------------------------- corruption


def kv_frame_with(**changes: object) -> bytes:
    """A valid kv frame for LAYOUT whose header fields are then overridden."""
    sent = random_slice(np.random.default_rng(3), LAYOUT, 1, 2, 3)
    prefix_and_header, keys, values = encode_kv(RID, sent)
    header = msgpack.unpackb(prefix_and_header[PREFIX.size :])
    for name, value in changes.items():
        if value is _DROP:
            del header[name]
        else:
            header[name] = value
    return frame_bytes(pack_frame(header, keys, values))


_DROP = object()


@given(position=st.integers(0, 2 * 2 * 3 * 4 * 2 - 1), bit=st.integers(0, 7))
def test_flipped_payload_bit_fails_the_checksum(position: int, bit: int) -> None:
    data = bytearray(kv_frame_with())
    payload_start = len(data) - 2 * 2 * 3 * 4 * 2  # keys + values of [2, 3, 4] float16
    data[payload_start + position] ^= 1 << bit
    with pytest.raises(FrameError, match="checksum"):
        decode_frame(bytes(data), rid=RID, layout=LAYOUT)


def test_unmodified_frame_from_the_corruption_helper_decodes() -> None:
    """The corruption cases below fail because of their one change, not the helper."""
    assert isinstance(decode_frame(kv_frame_with(), rid=RID, layout=LAYOUT), KVSlice)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rid", "req-2"),
        ("rid", b"req-1"),
        ("layer", 3),
        ("layer", -1),
        ("layer", "1"),
        ("layer", True),
        ("start", 10),
        ("start", -1),
        ("ntok", 0),
        ("ntok", 9),  # start 2 + 9 > 10 tokens
        ("ntok", 3.0),
        ("dtype", "float32"),
        ("dtype", "bfloat16"),
        ("shape", [2, 3]),
        ("shape", [2, 3, 5]),
        ("shape", [4, 3, 2]),
        ("shape", [2, 3, 4.0]),  # equal as numbers, wrong type
        ("codec", "zstd"),
        ("klen", 47),
        ("vlen", 49),
        ("checksum", "abc"),
        ("layer", _DROP),
        ("checksum", _DROP),
        ("priority", 1),
    ],
    ids=lambda v: repr(v) if v is not _DROP else "missing",
)
def test_each_wrong_kv_header_field_is_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(FrameError, match=repr(field)) as excinfo:
        decode_frame(kv_frame_with(**{field: value}), rid=RID, layout=LAYOUT)
    if value is not _DROP and field != "priority":
        assert "expected" in str(excinfo.value) and "got" in str(excinfo.value)


def test_wrong_dtype_against_layout_reports_expected_and_got() -> None:
    with pytest.raises(FrameError, match=r"'dtype': expected 'float16', got 'float32'"):
        decode_frame(kv_frame_with(dtype="float32"), rid=RID, layout=LAYOUT)


def test_truncated_frame_is_rejected_at_every_offset() -> None:
    for data in (kv_frame_with(), frame_bytes(encode_begin(RID, LAYOUT, {"t": 1.5}))):
        for cut in range(len(data)):
            with pytest.raises(FrameError, match="truncated"):
                decode_frame(data[:cut], rid=RID, layout=LAYOUT)


def test_trailing_bytes_after_a_frame_are_rejected() -> None:
    with pytest.raises(FrameError, match="trailing"):
        decode_frame(kv_frame_with() + b"\0", rid=RID, layout=LAYOUT)


def test_bad_magic_and_version_are_rejected() -> None:
    data = kv_frame_with()
    with pytest.raises(FrameError, match="magic"):
        decode_frame(b"XXXX" + data[4:], rid=RID, layout=LAYOUT)
    with pytest.raises(FrameError, match="version"):
        decode_frame(data[:4] + bytes([2]) + data[5:], rid=RID, layout=LAYOUT)


@pytest.mark.parametrize("header_len", [0, MAX_HEADER_BYTES + 1, 2**32 - 1])
def test_header_length_outside_limits_is_rejected_before_reading_it(header_len: int) -> None:
    data = PREFIX.pack(b"PDKV", 1, header_len) + b"\x80" * 16
    with pytest.raises(FrameError, match="header length"):
        decode_frame(data, rid=RID, layout=LAYOUT)


def test_oversized_header_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="header"):
        encode_begin(RID, LAYOUT, {"blob": "x" * MAX_HEADER_BYTES})


@pytest.mark.parametrize(
    ("header_bytes", "message"),
    [
        (b"\xc1", "msgpack"),  # never-used msgpack byte
        (b"\x92\x01\x02", "map"),  # [1, 2]
        (msgpack.packb({"kind": "hello", "rid": RID}), "'kind'"),
        (msgpack.packb({"rid": RID}), "'kind'"),
        (msgpack.packb({1: 2}), "msgpack"),  # non-string map key
        (msgpack.packb({"kind": "end", "rid": RID, "first_token": -1}), "'first_token'"),
        (msgpack.packb({"kind": "end", "rid": RID, "first_token": 1, "meta": [1]}), "'meta'"),
        (msgpack.packb({"kind": "abort", "rid": RID}), "'reason'"),
    ],
)
def test_malformed_headers_are_rejected(header_bytes: bytes, message: str) -> None:
    data = PREFIX.pack(b"PDKV", 1, len(header_bytes)) + header_bytes
    with pytest.raises(FrameError, match=message):
        decode_frame(data, rid=RID, layout=LAYOUT)


@pytest.mark.parametrize(
    ("layout_fields", "message"),
    [
        ({"num_layers": 2, "kv_heads": 2, "head_dim": 4, "dtype": "int8", "num_tokens": 3}, "int8"),
        ({"num_layers": 0, "kv_heads": 2, "head_dim": 4, "dtype": "float16", "num_tokens": 3}, "num_layers"),
        ({"num_layers": 2, "kv_heads": 2, "head_dim": 4, "dtype": "float16"}, "num_tokens"),
        ({"num_layers": 2, "kv_heads": "2", "head_dim": 4, "dtype": "float16", "num_tokens": 3}, "kv_heads"),
    ],
)
def test_begin_with_invalid_layout_is_rejected(layout_fields: dict, message: str) -> None:
    data = frame_bytes(pack_frame({"kind": "begin", "rid": RID, "layout": layout_fields}))
    with pytest.raises(FrameError, match=message):
        decode_frame(data, rid=RID)


def test_kv_frame_before_begin_is_rejected() -> None:
    with pytest.raises(FrameError, match="before its begin"):
        decode_frame(kv_frame_with(), rid=RID, layout=None)


def test_control_frame_for_another_request_is_rejected() -> None:
    with pytest.raises(FrameError, match="'rid'"):
        decode_frame(frame_bytes(encode_end("req-2", 7)), rid=RID, layout=LAYOUT)


# ---------------------------------------------------------------- reading from a socket


class ScriptedSocket:
    """Stands in for a socket: ``recv_into`` hands out ``data`` at most
    ``piece`` bytes at a time, then EOF (or a timeout, if ``stall``)."""

    def __init__(self, data: bytes, piece: int, stall: bool = False) -> None:
        self.data, self.piece, self.stall, self.offset = data, piece, stall, 0
        self.timeouts: list[float] = []

    def settimeout(self, timeout: float) -> None:
        self.timeouts.append(timeout)

    def recv_into(self, view: memoryview) -> int:
        n = min(self.piece, len(view), len(self.data) - self.offset)
        if n == 0 and self.stall:
            raise TimeoutError("timed out")  # what socket.timeout is
        view[:n] = self.data[self.offset : self.offset + n]
        self.offset += n
        return n


@given(chunked_layouts(), st.integers(1, 700))
@settings(max_examples=50, deadline=None)
def test_frame_reader_reassembles_frames_from_any_recv_sizes(case, piece: int) -> None:
    layout, chunks, seed = case
    rng = np.random.default_rng(seed)
    sent = [
        random_slice(rng, layout, layer, start, ntok) for layer in range(layout.num_layers) for start, ntok in chunks
    ]
    stream = frame_bytes(encode_begin(RID, layout)) + b"".join(frame_bytes(encode_kv(RID, s)) for s in sent)
    reader = FrameReader(ScriptedSocket(stream, piece))  # type: ignore[arg-type]
    deadline = float("inf")
    assert reader.read_frame(rid=RID, layout=None, deadline=deadline) == Begin(RID, layout, None)
    for want in sent:
        assert_same_slice(reader.read_frame(rid=RID, layout=layout, deadline=deadline), want)
    assert reader.bytes_received == len(stream)


def test_frame_reader_rejects_a_stream_cut_at_every_offset() -> None:
    data = kv_frame_with()
    for cut in range(len(data)):
        reader = FrameReader(ScriptedSocket(data[:cut], piece=5))  # type: ignore[arg-type]
        with pytest.raises(FrameError, match="closed"):
            reader.read_frame(rid=RID, layout=LAYOUT, deadline=float("inf"))


def test_frame_reader_turns_a_socket_timeout_into_frame_timeout() -> None:
    data = kv_frame_with()
    reader = FrameReader(ScriptedSocket(data[:20], piece=64, stall=True))  # type: ignore[arg-type]
    with pytest.raises(FrameTimeout, match="deadline"):
        reader.read_frame(rid=RID, layout=LAYOUT, deadline=float("inf"))
    assert issubclass(FrameTimeout, TimeoutError) and issubclass(FrameTimeout, FrameError)
