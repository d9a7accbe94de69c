"""Codecs and sliding windows on the KV wire: frames, transfers over 127.0.0.1, refusals."""
from __future__ import annotations

import contextlib
import random

import msgpack
import numpy as np
import pytest
import xxhash
from conftest import RID, WAIT_S, frame_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engines.base import KVLayout, KVSlice, check_layout
from workers.kv import kvcodecs
from workers.kv.codec import (
    PREFIX,
    Begin,
    FrameError,
    decode_frame,
    encode_begin,
    encode_kv,
    pack_frame,
)
from workers.kv.net import connect, send_buffers, serve_once
from workers.kv.transport import KVArena, KVReceiver, KVSender, TokenCoverage

LAYOUT = KVLayout(num_layers=3, kv_heads=2, head_dim=8, dtype="bfloat16", num_tokens=40)
CHUNKS = [(0, 16), (16, 16), (32, 8)]
# layer 0 full, layer 1 a 12-token window, layer 2 a 64-token window (wider than the prompt)
WINDOWED = KVLayout(3, 2, 8, "float32", 40, windows=(0, 12, 64))


def random_slice(rng: np.random.Generator, layout: KVLayout, layer: int, start: int, ntok: int) -> KVSlice:
    """Finite KV, N(0, 1) times a per-head spread, in the layout's wire dtype
    (the codecs refuse NaN and inf; raw bit patterns are tested elsewhere)."""
    shape = (layout.kv_heads, ntok, layout.head_dim)
    spread = rng.uniform(0.1, 20.0, (layout.kv_heads, 1, 1))
    keys, values = (kvcodecs.from_float32((rng.standard_normal(shape) * spread).astype(np.float32), layout.dtype)
                    for _ in range(2))
    return KVSlice(layer, start, np.ascontiguousarray(keys), np.ascontiguousarray(values), layout.dtype)


def make_slices(layout: KVLayout, chunks: list[tuple[int, int]], seed: int = 0) -> list[KVSlice]:
    rng = np.random.default_rng(seed)
    return [random_slice(rng, layout, layer, start, ntok) for start, ntok in chunks
            for layer in range(layout.num_layers)]


def decoded(kv_slice: KVSlice, codec: str) -> tuple[np.ndarray, np.ndarray]:
    """What the receiver should hold: the slice through the codec's own round trip."""
    return kvcodecs.decode(kvcodecs.encode_slice(codec, kv_slice))


def send_transfer(port: int, slices: list[KVSlice], layout: KVLayout, codec: str) -> KVSender:
    with connect("127.0.0.1", port, timeout=WAIT_S) as sock:
        sender = KVSender(sock, timeout=WAIT_S)
        sender.begin(RID, layout, codec=codec)
        for kv_slice in slices:
            sender.send_slice(kv_slice)
        sender.end(first_token=7)
    return sender


def receive_one(**kwargs: object) -> tuple:
    arrivals: list[KVSlice] = []
    receiver = KVReceiver(on_slice=arrivals.append)
    server = serve_once(lambda sock: receiver.receive(sock, **{"timeout": WAIT_S, **kwargs}))
    return server, arrivals


# ---------------------------------------------------------------- codecs in frames


@pytest.mark.parametrize("codec", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_encoded_kv_frame_decodes_to_the_codecs_own_round_trip(codec: str, dtype: str) -> None:
    layout = KVLayout(2, 2, 8, dtype, 10)
    sent = random_slice(np.random.default_rng(1), layout, 1, 3, 5)
    buffers = encode_kv(RID, sent, codec)
    header = msgpack.unpackb(buffers[0][PREFIX.size:])
    per_tensor = kvcodecs.encoded_nbytes(codec, 2, 5, 8, dtype) // 2
    assert (header["codec"], header["klen"], header["vlen"]) == (codec, per_tensor, per_tensor)

    got = decode_frame(frame_bytes(buffers), rid=RID, layout=layout, codec=codec)

    keys, values = decoded(sent, codec)
    assert (got.layer, got.start, got.dtype) == (1, 3, dtype)
    np.testing.assert_array_equal(got.keys, keys)
    np.testing.assert_array_equal(got.values, values)


def test_encoded_frame_is_smaller_on_the_wire_than_raw() -> None:
    sent = random_slice(np.random.default_rng(2), LAYOUT, 0, 0, 16)
    raw = len(frame_bytes(encode_kv(RID, sent)))
    int8 = len(frame_bytes(encode_kv(RID, sent, "int8")))
    assert int8 < 0.7 * raw  # bf16 head_dim 8: codes are half, scales add 2 bytes per 8 codes


def test_begin_names_its_codec_and_an_unknown_codec_is_refused() -> None:
    begin = decode_frame(frame_bytes(encode_begin(RID, LAYOUT, codec="int8")))
    assert isinstance(begin, Begin) and begin.codec == "int8"
    header = {"kind": "begin", "rid": RID, "codec": "zstd",
              "layout": {"num_layers": 3, "kv_heads": 2, "head_dim": 8, "dtype": "bfloat16", "num_tokens": 40}}
    with pytest.raises(FrameError, match=r"'codec': expected one of raw/int8/fp8 .*got 'zstd'"):
        decode_frame(frame_bytes(pack_frame(header)))
    with pytest.raises(ValueError, match="unknown KV codec"):
        encode_begin(RID, LAYOUT, codec="zstd")


def test_begin_without_a_codec_field_is_raw() -> None:
    header = {"kind": "begin", "rid": RID,
              "layout": {"num_layers": 3, "kv_heads": 2, "head_dim": 8, "dtype": "bfloat16", "num_tokens": 40}}
    assert decode_frame(frame_bytes(pack_frame(header))).codec == "raw"


def test_kv_frame_in_a_codec_other_than_the_transfers_or_raw_is_refused() -> None:
    sent = random_slice(np.random.default_rng(3), LAYOUT, 0, 0, 4)
    fp8_frame = frame_bytes(encode_kv(RID, sent, "fp8"))
    with pytest.raises(FrameError, match=r"'codec': expected int8/raw \(the begin frame named 'int8'\), got 'fp8'"):
        decode_frame(fp8_frame, rid=RID, layout=LAYOUT, codec="int8")
    raw_frame = frame_bytes(encode_kv(RID, sent))
    assert isinstance(decode_frame(raw_frame, rid=RID, layout=LAYOUT, codec="int8"), KVSlice)


def test_encoded_frame_with_raw_byte_counts_is_refused() -> None:
    sent = random_slice(np.random.default_rng(4), LAYOUT, 0, 0, 4)
    prefix_and_header, *payload = encode_kv(RID, sent, "int8")
    header = msgpack.unpackb(prefix_and_header[PREFIX.size:])
    header["klen"] = header["vlen"] = sent.keys.nbytes
    with pytest.raises(FrameError, match=r"'klen': expected \d+ \(int8\)"):
        decode_frame(frame_bytes(pack_frame(header, *payload)), rid=RID, layout=LAYOUT, codec="int8")


def test_flipped_bit_in_an_encoded_payload_fails_the_checksum() -> None:
    sent = random_slice(np.random.default_rng(5), LAYOUT, 2, 8, 8)
    data = bytearray(frame_bytes(encode_kv(RID, sent, "int8")))
    data[-3] ^= 0x10
    with pytest.raises(FrameError, match="checksum"):
        decode_frame(bytes(data), rid=RID, layout=LAYOUT, codec="int8")


def test_scales_the_encoder_never_writes_are_refused_after_the_checksum() -> None:
    """A sender bug (a negative scale) with a valid checksum: refused, not decoded into garbage."""
    sent = random_slice(np.random.default_rng(6), LAYOUT, 0, 0, 4)
    encoded = kvcodecs.encode_slice("int8", sent)
    encoded.keys.scales[0, 0] = -1.0
    prefix_and_header, *_ = encode_kv(RID, sent, "int8")
    header = msgpack.unpackb(prefix_and_header[PREFIX.size:])
    payload = b"".join(bytes(b) for b in encoded.buffers())
    header["checksum"] = xxhash.xxh3_64_intdigest(payload)
    with pytest.raises(FrameError, match="does not decode as int8: int8 scales must be finite and >= 0"):
        decode_frame(frame_bytes(pack_frame(header, payload)), rid=RID, layout=LAYOUT, codec="int8")


# ---------------------------------------------------------------- transfers over TCP


@pytest.mark.parametrize("codec", ["raw", "int8", "fp8"])
@pytest.mark.parametrize("use_arena", [False, True], ids=["fresh-arrays", "reserved-arena"])
def test_transfer_under_each_codec_delivers_the_decoded_slices(codec: str, use_arena: bool) -> None:
    slices = make_slices(LAYOUT, CHUNKS, seed=11)
    random.Random(3).shuffle(slices)
    arena = KVArena(LAYOUT) if use_arena else None
    server, _ = receive_one(expect_rid=RID, expected_layout=LAYOUT, arena=arena)

    sender = send_transfer(server.port, slices, LAYOUT, codec)
    received = server.result(WAIT_S)

    assert received.codec == codec and sender.raw_fallbacks == 0
    assert received.bytes_received == sender.bytes_sent
    for got, want in zip(received.slices, slices, strict=True):
        keys, values = decoded(want, codec)
        np.testing.assert_array_equal(got.keys, keys)
        np.testing.assert_array_equal(got.values, values)
        assert got.keys.dtype == want.keys.dtype


def test_compressed_transfer_sends_about_half_the_bytes_of_raw_bf16() -> None:
    slices = make_slices(LAYOUT, CHUNKS, seed=12)
    sizes = {}
    for codec in ("raw", "int8"):
        server, _ = receive_one()
        sizes[codec] = send_transfer(server.port, slices, LAYOUT, codec).bytes_sent
        server.result(WAIT_S)
    assert sizes["int8"] < 0.7 * sizes["raw"]


def test_a_slice_holding_nan_goes_raw_and_arrives_bit_exact_beside_encoded_ones() -> None:
    layout = KVLayout(2, 2, 8, "float32", 16)
    slices = make_slices(layout, [(0, 8), (8, 8)], seed=13)
    poisoned = slices[1]
    poisoned.keys[1, 2, 3] = np.nan
    poisoned.values[0, 0, 0] = np.inf
    server, _ = receive_one()

    sender = send_transfer(server.port, slices, layout, "int8")
    received = server.result(WAIT_S)

    assert sender.raw_fallbacks == 1
    got = {(s.layer, s.start): s for s in received.slices}
    bad = got[(poisoned.layer, poisoned.start)]
    assert bad.keys.tobytes() == poisoned.keys.tobytes() and bad.values.tobytes() == poisoned.values.tobytes()
    for want in slices:
        if want is not poisoned:
            np.testing.assert_array_equal(got[(want.layer, want.start)].keys, decoded(want, "int8")[0])


def test_receiver_refuses_a_transfer_whose_begin_names_an_unknown_codec() -> None:
    server, _ = receive_one()
    header = {"kind": "begin", "rid": RID, "codec": "lz4",
              "layout": {"num_layers": 3, "kv_heads": 2, "head_dim": 8, "dtype": "bfloat16", "num_tokens": 40}}
    with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
        send_buffers(sock, pack_frame(header))
        with pytest.raises(FrameError, match="got 'lz4'"):
            server.result(WAIT_S)


# ---------------------------------------------------------------- sliding windows


def test_windowed_layout_ships_each_sliding_layers_last_window_tokens() -> None:
    assert [WINDOWED.layer_start(i) for i in range(3)] == [0, 28, 0]
    assert [WINDOWED.layer_tokens(i) for i in range(3)] == [40, 12, 40]
    per_token_layer = 2 * 2 * 8 * 4
    assert WINDOWED.total_bytes == per_token_layer * (40 + 12 + 40)
    assert WINDOWED.bytes_per_token == 3 * per_token_layer  # the unwindowed figure
    short = WINDOWED.with_tokens(5)
    assert [short.layer_start(i) for i in range(3)] == [0, 0, 0] and short.total_bytes == per_token_layer * 15


def test_all_zero_windows_are_the_plain_layout_and_bad_windows_are_refused() -> None:
    assert KVLayout(2, 1, 4, "float32", 9, windows=(0, 0)) == KVLayout(2, 1, 4, "float32", 9)
    with pytest.raises(ValueError, match="2 entries for 3 layers"):
        KVLayout(3, 1, 4, "float32", 9, windows=(0, 4))
    with pytest.raises(ValueError, match="ints >= 0"):
        KVLayout(2, 1, 4, "float32", 9, windows=(0, -4))
    with pytest.raises(ValueError, match="windows is"):
        check_layout(KVLayout(2, 1, 4, "float32", 9, windows=(0, 4)), KVLayout(2, 1, 4, "float32", 9))


@given(start=st.integers(0, 39), ntok=st.integers(1, 40))
def test_clip_keeps_exactly_the_tokens_inside_the_window(start: int, ntok: int) -> None:
    ntok = min(ntok, 40 - start)
    kv_slice = random_slice(np.random.default_rng(start), WINDOWED, 1, start, ntok)
    clipped = WINDOWED.clip(kv_slice)
    end = start + ntok
    if end <= 28:
        assert clipped is None
        return
    first = max(start, 28)
    assert (clipped.start, clipped.num_tokens) == (first, end - first)
    np.testing.assert_array_equal(clipped.keys, kv_slice.keys[:, first - start:])
    assert WINDOWED.clip(random_slice(np.random.default_rng(0), WINDOWED, 0, start, ntok)).start == start


def test_windowed_layout_round_trips_through_the_begin_frame() -> None:
    begin = decode_frame(frame_bytes(encode_begin(RID, WINDOWED)))
    assert begin.layout == WINDOWED
    header = msgpack.unpackb(encode_begin(RID, WINDOWED)[0][PREFIX.size:])
    header["layout"]["windows"] = [0, "12", 64]
    with pytest.raises(FrameError, match="'windows': expected a list of ints"):
        decode_frame(frame_bytes(pack_frame(header)))


def test_kv_frame_before_its_layers_window_is_refused_naming_the_window() -> None:
    early = random_slice(np.random.default_rng(7), WINDOWED, 1, 20, 4)
    with pytest.raises(FrameError, match=r"'start': expected 28..39 \(layer 1 ships its last 12 tokens\)"):
        decode_frame(frame_bytes(encode_kv(RID, early)), rid=RID, layout=WINDOWED)


@pytest.mark.parametrize("codec", ["raw", "int8"])
@pytest.mark.parametrize("chunk", [7, 16, 40], ids=lambda c: f"chunk{c}")
def test_windowed_transfer_sends_only_the_windows_and_the_receiver_finds_it_complete(
    codec: str, chunk: int
) -> None:
    """The sender is handed every chunk of every layer, as an engine emits
    them; chunk 7 straddles the window start (28) of layer 1."""
    chunks = [(s, min(chunk, 40 - s)) for s in range(0, 40, chunk)]
    slices = make_slices(WINDOWED, chunks, seed=21)
    server, _ = receive_one(expected_layout=WINDOWED, arena=KVArena(WINDOWED))

    send_transfer(server.port, slices, WINDOWED, codec)
    received = server.result(WAIT_S)

    coverage: dict[int, list[tuple[int, int]]] = {}
    for s in received.slices:
        coverage.setdefault(s.layer, []).append((s.start, s.start + s.num_tokens))
    for layer in range(3):
        spans = sorted(coverage[layer])
        assert spans[0][0] == WINDOWED.layer_start(layer) and spans[-1][1] == 40
    full = {(s.layer, s.start): s for s in slices}
    layer1 = sorted((s for s in received.slices if s.layer == 1), key=lambda s: s.start)
    keys = np.concatenate([s.keys for s in layer1], axis=1)
    sent = np.concatenate([full[(1, s)].keys for s, _ in chunks], axis=1)[:, 28:]
    # int8's scales are per token and head: the same codes whatever the chunking
    want = sent if codec == "raw" else kvcodecs.decode(kvcodecs.encode(codec, sent, sent, "float32"))[0]
    np.testing.assert_array_equal(keys, want)


def test_token_coverage_of_a_sliding_layer_starts_at_its_window() -> None:
    coverage = TokenCoverage(WINDOWED)
    coverage.add(0, 0, 40)
    coverage.add(2, 0, 40)
    coverage.add(1, 30, 10)
    assert coverage.first_gap() == (1, 28, 30)
    coverage.add(1, 28, 2)
    assert coverage.first_gap() is None


@settings(max_examples=25, deadline=None)
@given(codec=st.sampled_from(["raw", "int8", "fp8"]), seed=st.integers(0, 2**16))
def test_arena_of_a_windowed_layout_is_filled_exactly(codec: str, seed: int) -> None:
    arena = KVArena(WINDOWED, prefault=False)
    server, _ = receive_one(arena=arena)
    slices = make_slices(WINDOWED, CHUNKS, seed=seed)
    send_transfer(server.port, slices, WINDOWED, codec)
    server.result(WAIT_S)
    assert arena._used == WINDOWED.total_bytes


# ---------------------------------------------------------------- checksums taken where slices are produced


def test_slice_digest_is_the_raw_frames_checksum_and_the_frame_carries_it_unchanged() -> None:
    from workers.kv.codec import slice_digest

    sent = random_slice(np.random.default_rng(8), LAYOUT, 1, 4, 6)
    digested = slice_digest(sent)
    assert digested.checksum == xxhash.xxh3_64_intdigest(sent.keys.tobytes() + sent.values.tobytes())
    header = msgpack.unpackb(encode_kv(RID, digested)[0][PREFIX.size:])
    assert header["checksum"] == digested.checksum
    assert slice_digest(digested) is digested


def test_a_producer_checksum_that_does_not_match_the_bytes_is_caught_by_the_receiver() -> None:
    """The digest travels end to end: bytes changed after it was taken fail
    the transfer, just as bytes changed on the wire do."""
    from dataclasses import replace

    from workers.kv.codec import slice_digest

    slices = [slice_digest(s) for s in make_slices(LAYOUT, CHUNKS, seed=9)]
    slices[4] = replace(slices[4], checksum=slices[4].checksum ^ 1)
    server, _ = receive_one()
    with contextlib.suppress(OSError):  # the receiver hangs up at the bad frame
        send_transfer(server.port, slices, LAYOUT, "raw")
    with pytest.raises(FrameError, match="checksum"):
        server.result(WAIT_S)


def test_the_pusher_digests_raw_slices_on_the_producing_thread_and_not_encoded_ones() -> None:
    import threading

    from workers.kv.listener import KVPusher

    for codec, expect_digest in (("raw", True), ("int8", False)):
        server, _ = receive_one()
        queued: list[KVSlice] = []
        with connect("127.0.0.1", server.port, timeout=WAIT_S) as sock:
            pusher = KVPusher(sock, threaded=True, timeout=WAIT_S)
            original = pusher._put

            def spy(kind: str, item: object, nbytes: int, original=original, queued=queued) -> None:
                if kind == "kv":
                    assert threading.current_thread() is threading.main_thread()
                    queued.append(item)  # type: ignore[arg-type]
                original(kind, item, nbytes)

            pusher._put = spy  # type: ignore[method-assign]
            pusher.begin(RID, WINDOWED, codec=codec)
            for kv_slice in make_slices(WINDOWED, [(0, 20), (20, 20)], seed=10):
                pusher.send_slice(kv_slice)
            pusher.end(1)
            pusher.done.result(WAIT_S)
            server.result(WAIT_S)
        assert all((s.checksum is not None) == expect_digest for s in queued)
        # layer 1's first chunk (tokens 0..20) lies wholly before its window (28..40): never queued
        assert sorted((s.layer, s.start, s.num_tokens) for s in queued if s.layer == 1) == [(1, 28, 12)]


def test_a_kv_frame_without_its_codec_field_is_a_frame_error() -> None:
    prefix_and_header, *payload = encode_kv(RID, random_slice(np.random.default_rng(9), LAYOUT, 0, 0, 4))
    header = msgpack.unpackb(prefix_and_header[PREFIX.size:])
    del header["codec"]
    with pytest.raises(FrameError, match="kv header: missing field 'codec'"):
        decode_frame(frame_bytes(pack_frame(header, *payload)), rid=RID, layout=LAYOUT)


def test_clip_hands_out_contiguous_arrays() -> None:
    cut = WINDOWED.clip(random_slice(np.random.default_rng(10), WINDOWED, 1, 20, 16))
    assert cut.keys.flags.c_contiguous and cut.values.flags.c_contiguous
