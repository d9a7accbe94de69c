"""The KV codecs (raw, int8, fp8) round-trip every shape and wire dtype within
their stated error bounds, refuse non-finite input naming where it is, and
size their wire bytes exactly as ``encoded_nbytes`` says."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.engines.base import KVSlice, numpy_dtype
from workers.kv.kvcodecs import (
    CODECS,
    E4M3_TABLE,
    FINITE_MAX,
    EncodedSlice,
    UnencodableKV,
    check_codec,
    decode,
    e4m3_decode,
    e4m3_encode,
    encode,
    encode_slice,
    encoded_nbytes,
    from_float32,
    to_float32,
)

# no overflow, 0/0 or invalid cast anywhere on the way: each edge is handled, not ignored
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

DTYPES = ("float32", "float16", "bfloat16")
LOSSY = ("int8", "fp8")
FAST = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])


def wire(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as wire ``dtype`` (round to nearest even)."""
    return from_float32(np.array(x32, dtype=np.float32), dtype)


def as64(array: np.ndarray, dtype: str) -> np.ndarray:
    return to_float32(array, dtype).astype(np.float64)


def joined(encoded: EncodedSlice) -> bytes:
    return b"".join(bytes(b) for b in encoded.buffers())


@st.composite
def kv_tensors(draw: st.DrawFn, codec: str = "fp8") -> tuple[np.ndarray, np.ndarray, str]:
    """Keys and values in a wire dtype: normal data at a random magnitude per
    head (int8: below its 127 * 65504 limit), some all-zero rows, shapes up to
    8 x 300 x 128 (kept small on average)."""
    dtype = draw(st.sampled_from(DTYPES))
    heads = draw(st.integers(1, 8))
    tokens = draw(st.one_of(st.integers(0, 12), st.integers(0, 300)))
    head_dim = draw(st.one_of(st.sampled_from([1, 2, 3, 16, 64, 128]), st.integers(1, 128)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    low, high = (-6, 4) if dtype == "float16" else (-30, 5 if codec == "int8" else 30)
    out = []
    for _ in range(2):
        magnitude = 10.0 ** rng.uniform(low, high, size=(heads, 1, 1))
        x = rng.standard_normal((heads, tokens, head_dim)) * magnitude  # [kv_heads, tokens, head_dim]
        x[:, rng.random(tokens) < 0.1] = 0.0  # all-zero rows
        out.append(wire(x.astype(np.float32), dtype))
    return out[0], out[1], dtype


# ---------------------------------------------------------------- round trips and bounds


@given(st.sampled_from(tuple(CODECS)).flatmap(lambda c: st.tuples(st.just(c), kv_tensors(c))))
@FAST
def test_every_codec_round_trips_shape_dtype_and_its_exact_wire_size(case) -> None:
    codec, (keys, values, dtype) = case
    encoded = encode(codec, keys, values, dtype)
    payload = joined(encoded)
    assert len(payload) == encoded.nbytes == encoded_nbytes(codec, *keys.shape, dtype)
    got_keys, got_values = decode(EncodedSlice.from_buffer(codec, dtype, encoded.shape, payload))
    direct_keys, direct_values = decode(encoded)
    for got, direct, sent in ((got_keys, direct_keys, keys), (got_values, direct_values, values)):
        assert got.dtype == numpy_dtype(dtype) and got.shape == sent.shape
        assert got.tobytes() == direct.tobytes()  # the bytes on the wire carry everything
        assert np.isfinite(as64(got, dtype)).all()
        if codec == "raw":
            assert got.tobytes() == sent.tobytes()
        zero_rows = ~np.any(as64(sent, dtype) != 0, axis=-1)
        assert not np.any(as64(got, dtype)[zero_rows])  # all-zero rows decode to zeros


@given(kv_tensors("int8"))
@FAST
def test_int8_error_is_at_most_half_its_row_scale(kv) -> None:
    keys, values, dtype = kv
    encoded = encode("int8", keys, values, dtype)
    decoded = decode(encoded, "float32")  # code * scale, before the cast to the wire dtype
    for sent, got, part in ((keys, decoded[0], encoded.keys), (values, decoded[1], encoded.values)):
        x = as64(sent, dtype)
        scale = part.scales.astype(np.float64)[..., None]  # [kv_heads, tokens, 1]
        assert part.scales.dtype == np.float16 and part.codes.dtype == np.int8
        assert np.all(np.abs(part.codes) <= 127)
        assert np.all(127 * scale >= np.max(np.abs(x), axis=-1, keepdims=True, initial=0))  # rounded up
        # the float32 division x / scale may land one ulp across a .5
        assert np.all(np.abs(x - got) <= scale / 2 + np.abs(x) * 2.0**-23)


@given(kv_tensors())
@FAST
def test_fp8_relative_error_is_at_most_2_pow_minus_4_in_e4m3s_normal_range(kv) -> None:
    keys, values, dtype = kv
    encoded = encode("fp8", keys, values, dtype)
    decoded = decode(encoded, "float32")
    for sent, got, part in ((keys, decoded[0], encoded.keys), (values, decoded[1], encoded.values)):
        x = as64(sent, dtype)
        scale = part.scales.astype(np.float64)[:, None, None]  # [kv_heads, 1, 1]
        assert part.scales.dtype == np.float32 and part.codes.dtype == np.uint8
        err = np.abs(x - got)
        normal = np.abs(x) >= scale * 2.0**-6
        assert np.all(err[normal] <= np.abs(x[normal]) * (2.0**-4 + 2.0**-20))
        # below e4m3's normal range: half a subnormal step (2^-10) of the scale
        bound = np.broadcast_to(scale * 2.0**-10 * (1 + 2.0**-20), x.shape) + np.abs(x) * 2.0**-20
        assert np.all(err[~normal] <= bound[~normal])


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_largest_finite_value_of_each_dtype_stays_finite(codec: str, dtype: str) -> None:
    """fp8 takes each dtype's largest value, int8 up to 127 * 65504; both
    saturate at the dtype's largest finite value instead of decoding to inf
    (int8's rounded-up scale makes 127 * scale exceed float16's 65504)."""
    int8_big = {"float32": 127 * 65504.0, "float16": 65504.0, "bfloat16": 8.0e6}  # bf16 rounds 127 * 65504 up
    big = FINITE_MAX[dtype] if codec == "fp8" else int8_big[dtype]
    x = np.array([[[big, -big, big / 2, -big / 1.5], [-big, big / 1.25, -big / 1.75, big]]], np.float32)  # [1, 2, 4]
    sent = wire(x, dtype)
    got = as64(decode(encode(codec, sent, sent, dtype))[0], dtype)
    want = as64(sent, dtype)
    assert np.isfinite(got).all()
    assert np.all(np.abs(got - want) <= np.abs(want) * 2.0**-4)
    assert np.max(np.abs(got)) <= FINITE_MAX[dtype]
    if dtype == "float16":
        assert got[0, 0, 0] == 65504 and got[0, 0, 1] == -65504  # saturated, not inf


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_inputs_stay_within_the_bounds(codec: str, dtype: str) -> None:
    tiny = {"float32": 1e-45, "float16": 6e-8, "bfloat16": 1e-40}[dtype]
    x = np.array([[[tiny, -tiny, 3 * tiny, 0.0]], [[2 * tiny, 0.0, 0.0, -tiny]]], dtype=np.float32)  # [2, 1, 4]
    sent = wire(x, dtype)
    assert np.all(as64(sent, dtype)[..., 0] != 0)  # really subnormal, not flushed
    encoded = encode(codec, sent, sent, dtype)
    got = as64(decode(encoded)[0], dtype)
    scales = encoded.keys.scales.astype(np.float64)
    assert np.all(scales > 0)
    bound = scales[..., None] / 2 if codec == "int8" else scales[:, None, None] * 2.0**-10
    assert np.all(np.abs(got - as64(sent, dtype)) <= bound + np.abs(as64(sent, dtype)) * 2.0**-4)


@pytest.mark.parametrize("codec", LOSSY)
def test_an_all_zero_tensor_has_zero_scales_and_decodes_to_zero(codec: str) -> None:
    zeros = np.zeros((3, 5, 8), np.float16)
    encoded = encode(codec, zeros, zeros, "float16")
    assert not encoded.keys.scales.any() and not encoded.keys.codes.any()
    assert not decode(encoded)[1].any()


def test_int8_refuses_a_row_whose_scale_would_overflow_float16() -> None:
    x = np.ones((2, 3, 4), np.float32)
    x[1, 2, 0] = 127 * 65520.0  # scale above float16's largest
    assert encode("fp8", x, x, "float32").nbytes  # fp8's float32 scales take it
    with pytest.raises(UnencodableKV, match="int8 codec cannot encode keys of layer 5: .*head 1 token 2"):
        encode("int8", x, x, "float32", layer=5)


def test_decoding_into_another_wire_dtype_is_the_float32_decode_cast_as_torch_would() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    for codec in CODECS:
        encoded = encode(codec, x, x, "float32")
        as_f32 = decode(encoded, "float32")[0]
        assert decode(encoded, "bfloat16")[0].tobytes() == from_float32(as_f32.copy(), "bfloat16").tobytes()
        assert decode(encoded, "float16")[0].tobytes() == as_f32.astype(np.float16).tobytes()


# ---------------------------------------------------------------- NaN / inf policy


@given(
    dtype=st.sampled_from(DTYPES), codec=st.sampled_from(LOSSY), tensor=st.sampled_from(["keys", "values"]),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    head=st.integers(0, 3), token=st.integers(0, 9), dim=st.integers(0, 7),
)
@FAST
def test_lossy_codecs_refuse_non_finite_values_naming_tensor_layer_head_and_token(
        dtype: str, codec: str, tensor: str, bad: float, head: int, token: int, dim: int) -> None:
    x = np.ones((4, 10, 8), np.float32)
    y = x.copy()
    y[head, token, dim] = bad
    keys, values = (wire(y, dtype), wire(x, dtype)) if tensor == "keys" else (wire(x, dtype), wire(y, dtype))
    with pytest.raises(UnencodableKV) as caught:
        encode_slice(codec, KVSlice(7, 0, keys, values, dtype))
    assert (caught.value.tensor, caught.value.layer, caught.value.head, caught.value.token) == (tensor, 7, head, token)
    assert f"{codec} codec cannot encode {tensor} of layer 7" in str(caught.value)
    assert f"head {head} token {token}" in str(caught.value) and "raw" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    # raw carries the same slice bit-exact, NaN payload included
    raw = decode(encode("raw", keys, values, dtype))
    assert raw[0].tobytes() == keys.tobytes() and raw[1].tobytes() == values.tobytes()


@pytest.mark.parametrize(("codec", "tamper", "match"), [
    ("int8", lambda e: e.keys.codes.__setitem__((0, 0, 0), -128), "-128"),
    ("int8", lambda e: e.values.scales.__setitem__((1, 1), np.nan), "scales must be finite"),
    ("int8", lambda e: e.keys.scales.__setitem__((0, 2), -1.0), "scales must be finite and >= 0"),
    ("fp8", lambda e: e.values.codes.__setitem__((1, 2, 3), 0x7F), "NaN"),
    ("fp8", lambda e: e.keys.codes.__setitem__((0, 0, 0), 0xFF), "NaN"),
    ("fp8", lambda e: e.keys.scales.__setitem__(1, np.inf), "scales must be finite"),
])
def test_the_decoder_refuses_codes_and_scales_the_encoder_never_writes(codec, tamper, match) -> None:
    x = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
    payload = bytearray(joined(encode(codec, x, x, "float32")))
    tampered = EncodedSlice.from_buffer(codec, "float32", (2, 4, 8), payload)  # writable views into payload
    tamper(tampered)
    with pytest.raises(ValueError, match=match):
        decode(EncodedSlice.from_buffer(codec, "float32", (2, 4, 8), bytes(payload)))


# ---------------------------------------------------------------- e4m3, exhaustively


def e4m3_value(code: int) -> float:
    """OCP FP8 E4M3FN from its definition: bias 7, no infinities, NaN at S.1111.111."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa * 2.0**-9
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


FINITE_CODES = np.array([c for c in range(256) if not math.isnan(e4m3_value(c))], np.uint8)


def test_every_e4m3_code_decodes_to_its_ocp_value_and_re_encodes_to_itself() -> None:
    want = np.array([e4m3_value(c) for c in range(256)], np.float32)
    assert np.array_equal(e4m3_decode(np.arange(256, dtype=np.uint8)), want, equal_nan=True)
    assert np.array_equal(E4M3_TABLE, want, equal_nan=True)
    assert e4m3_value(0x7E) == 448 and e4m3_value(0x08) == 2.0**-6 and e4m3_value(0x01) == 2.0**-9
    assert np.array_equal(e4m3_encode(e4m3_decode(FINITE_CODES)), FINITE_CODES)  # -0.0 (0x80) included


def test_e4m3_midpoints_round_to_the_even_code_and_their_neighbours_to_the_nearer() -> None:
    for sign in (1.0, -1.0):
        codes = np.array([c for c in FINITE_CODES if (c & 0x80) == (0x80 if sign < 0 else 0)], np.uint8)
        codes = codes[np.argsort(np.abs(e4m3_decode(codes)))]  # by magnitude: 0, 2^-9, ..., 448
        low, high = codes[:-1], codes[1:]
        mid = ((e4m3_decode(low).astype(np.float64) + e4m3_decode(high)) / 2).astype(np.float32)
        assert np.all(mid.astype(np.float64) * 2 == e4m3_decode(low).astype(np.float64) + e4m3_decode(high))
        even = np.where(low % 2 == 0, low, high)
        assert np.array_equal(e4m3_encode(mid), even)
        toward_zero = np.nextafter(mid, np.float32(0))
        away = np.nextafter(mid, np.float32(sign * np.inf))
        assert np.array_equal(e4m3_encode(toward_zero), low)
        assert np.array_equal(e4m3_encode(away), high)


def test_e4m3_saturates_at_448_and_keeps_nan() -> None:
    x = np.array([448, 449, 463.9, 464, 480, 1e30, np.inf, -464, -np.inf, np.nan, -np.nan], np.float32)
    assert e4m3_encode(x).tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x7F, 0xFF]


def test_e4m3_encode_is_the_nearest_code_ties_to_even_across_every_binade() -> None:
    rng = np.random.default_rng(11)
    x = (rng.uniform(-1, 1, 200_000) * 2.0 ** rng.uniform(-14, 9.2, 200_000)).astype(np.float32)
    x = np.clip(x, -448, 448)
    values = e4m3_decode(FINITE_CODES).astype(np.float64)
    got = e4m3_decode(e4m3_encode(x)).astype(np.float64)
    best = np.min(np.abs(x.astype(np.float64)[:, None] - values[None, :]), axis=1)
    assert np.array_equal(np.abs(got - x), best)  # no code is nearer (ties: the midpoint test)
    assert np.all(np.signbit(got) == np.signbit(x))


def test_e4m3_encode_matches_torchs_float8_e4m3fn_cast_where_torch_does_not_overflow() -> None:
    torch = pytest.importorskip("torch", reason="torch is the optional oracle for the e4m3 cast")
    rng = np.random.default_rng(5)
    x = np.clip((rng.standard_normal(100_000) * 2.0 ** rng.uniform(-15, 9, 100_000)).astype(np.float32), -448, 448)
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(e4m3_encode(x), want)


# ---------------------------------------------------------------- bf16 edge


def test_bfloat16_casts_round_to_nearest_even_like_torch() -> None:
    ties = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 1 + 2.0**-8 + 2.0**-20], np.float32)
    got = as64(from_float32(ties.copy(), "bfloat16"), "bfloat16")
    assert got.tolist() == [1.0, 1 + 2.0**-6, -1.0, 1 + 2.0**-7]
    bits = np.arange(0, 2**16, dtype=np.uint16)
    assert to_float32(bits, "bfloat16").view(np.uint32).tolist() == (bits.astype(np.uint32) << 16).tolist()
    torch = pytest.importorskip("torch", reason="torch is the optional oracle for the bf16 cast")
    x = np.random.default_rng(2).integers(0, 2**32, 200_000, dtype=np.uint32).view(np.float32)  # NaN, inf included
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.uint16).numpy()
    got = from_float32(x.copy(), "bfloat16")
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(to_float32(got[nan], "bfloat16")).all()


# ---------------------------------------------------------------- API edges


def test_unknown_codecs_are_refused_naming_the_known_ones() -> None:
    x = np.zeros((1, 1, 1), np.float32)
    for call in (lambda: check_codec("zstd"), lambda: encode("zstd", x, x, "float32"),
                 lambda: encoded_nbytes("zstd", 1, 1, 1, "float32"),
                 lambda: EncodedSlice.from_buffer("zstd", "float32", (1, 1, 1), b"")):
        with pytest.raises(ValueError, match=r"unknown KV codec 'zstd'; known codecs: raw, int8, fp8"):
            call()
    assert check_codec("int8").name == "int8"


def test_encoded_nbytes_is_codes_plus_scales() -> None:
    h, t, d = 8, 300, 128
    assert encoded_nbytes("raw", h, t, d, "bfloat16") == 2 * h * t * d * 2
    assert encoded_nbytes("raw", h, t, d, "float32") == 2 * h * t * d * 4
    assert encoded_nbytes("int8", h, t, d, "float32") == 2 * (h * t * d + 2 * h * t)
    assert encoded_nbytes("fp8", h, t, d, "float16") == 2 * (h * t * d + 4 * h)


def test_encode_refuses_mismatched_shapes_and_dtypes() -> None:
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"\[kv_heads, tokens, head_dim\]"):
        encode("int8", x, x[:, :2], "float32")
    with pytest.raises(ValueError, match="float16 KV travels as float16, got float32"):
        encode("fp8", x, x, "float16")
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        encode("raw", x, x, "float64")


def test_from_buffer_reads_views_without_copying_and_checks_the_length() -> None:
    x = np.random.default_rng(1).standard_normal((3, 5, 7)).astype(np.float32)
    payload = joined(encode("int8", x, x, "float32"))
    encoded = EncodedSlice.from_buffer("int8", "float32", (3, 5, 7), payload)
    assert np.shares_memory(encoded.values.codes, np.frombuffer(payload, np.uint8))
    with pytest.raises(ValueError, match=f"is {len(payload)} bytes, got {len(payload) - 1}"):
        EncodedSlice.from_buffer("int8", "float32", (3, 5, 7), payload[:-1])
    assert decode(EncodedSlice.from_buffer("int8", "float32", [3, 5, 7], payload))[0].shape == (3, 5, 7)  # msgpack lists
    with pytest.raises(ValueError, match=r"\[kv_heads, tokens, head_dim\], got \(3, -5, 7\)"):
        EncodedSlice.from_buffer("int8", "float32", (3, -5, 7), payload)
