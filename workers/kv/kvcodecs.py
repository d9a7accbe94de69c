"""Compressed KV codecs for one layer's slice: ``raw``, ``int8`` and ``fp8``.

A codec turns a slice's keys and values (each ``[kv_heads, tokens, head_dim]``
in a wire dtype, bf16 as uint16 bit patterns) into byte buffers to send, and
back. Keys and values are encoded separately, each into codes plus scales:

* ``raw``: the wire dtype's own bytes; no scales.
* ``int8``: int8 codes in [-127, 127], one float16 scale per head and token
  (``[kv_heads, tokens]``), ``max|x| / 127`` rounded *up* to a float16 so
  that no code overflows.
* ``fp8``: OCP FP8 E4M3FN codes (uint8), one float32 scale per head
  (``[kv_heads]``), ``max|x| / 448`` over the head's tokens and dims.

A decoded element is ``code * scale`` in float32, cast to the wanted wire
dtype the way torch and mlx cast (float32 -> bf16 rounds to nearest even;
bf16 -> float32 is a 16-bit shift), saturating at the dtype's largest finite
value. A zero row (int8) or head (fp8) has scale 0 and decodes to zeros.

fp8's scales are float32, not float16: there are only ``kv_heads`` of them
per tensor (32 bytes for 8 heads beside ~100 KB of codes), and float16 cannot
hold ``max|x| / 448`` above ~2.9e7 or below ~2.7e-5 without overflow or lost
precision; float32 leaves e4m3's own rounding (relative 2^-4) as the only
error for every finite input. int8's per-token scales are float16 as issue 12
asks: there they cost 2 bytes per ``head_dim`` codes.

On the wire a slice is ``EncodedSlice.buffers()``: key scales, value scales,
key codes, value codes (scales first keeps every array aligned; raw has only
the codes: today's layout). ``EncodedSlice.from_buffer`` reads them back
without copying.

Non-finite values. ``raw`` ships NaN and inf bit-exact. ``int8`` and ``fp8``
refuse a tensor holding any (``UnencodableKV``, a ``ValueError`` naming the
codec, tensor, layer, head and token): one NaN would make its row's (int8) or
its whole head's (fp8) scale NaN or inf and silently turn every finite
neighbour into garbage, and saturating it instead would hand the decode node
plausible finite values the model never computed. The sender can send that
frame raw (each kv header names its codec) or fail the request; either way
no other request is touched. ``int8`` likewise refuses a row whose
``max|x|`` exceeds 127 * 65504 (its scale would overflow float16). The
decoder refuses what this encoder never writes: negative or non-finite
scales, the int8 code -128 and the e4m3 NaN codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workers.engines.base import KVSlice, numpy_dtype

Shape = tuple[int, int, int]  # [kv_heads, tokens, head_dim]

INT8_MAX = 127
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
FP16_MAX = 65504.0
FLOAT32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
# the largest finite value of each wire dtype, where decoding saturates
FINITE_MAX: dict[str, float] = {
    "float32": float(np.finfo(np.float32).max),
    "float16": FP16_MAX,
    "bfloat16": float(np.uint32(0x7F7F0000).view(np.float32)),
}


class UnencodableKV(ValueError):
    """A tensor the codec will not encode (non-finite values, or out of its
    range); ``raw`` carries it bit-exact."""

    def __init__(self, codec: str, tensor: str, layer: int | None, head: int, token: int,
                 reason: str) -> None:
        where = f"{tensor}" + (f" of layer {layer}" if layer is not None else "")
        super().__init__(f"{codec} codec cannot encode {where}: {reason}, the first at head {head} "
                         f"token {token}; send this slice raw or fail the request")
        self.codec, self.tensor, self.layer, self.head, self.token = codec, tensor, layer, head, token


# ---------------------------------------------------------------- dtype edges


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A wire-dtype array as float32 (exact for every wire dtype)."""
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32, copy=False)


def from_float32(array: np.ndarray, dtype: str, max_abs: float | None = None) -> np.ndarray:
    """float32 as wire dtype ``dtype``, rounding to nearest even as torch and
    mlx cast. ``max_abs``: a bound on ``|array|`` when it holds decoded codes,
    which then saturate at the dtype's largest finite value (their originals
    were finite; the clip is skipped when the bound says it cannot matter).
    None: any float32, cast exactly as torch casts (overflow to inf, NaN to
    a quiet NaN). ``array`` may be overwritten."""
    if max_abs is not None and max_abs > FINITE_MAX[dtype]:
        np.clip(array, -FINITE_MAX[dtype], FINITE_MAX[dtype], out=array)
    if dtype == "float32":
        return array
    if dtype == "float16":
        return array.astype(np.float16)
    nan = np.isnan(array) if max_abs is None else None
    bits = array.view(np.uint32)
    bits += ((bits >> 16) & 1) + np.uint32(0x7FFF)  # round to nearest even at bit 16
    out = (bits >> 16).astype(np.uint16)
    if nan is not None:
        out[nan] = 0x7FC0
    return out


# ---------------------------------------------------------------- e4m3


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(exponent == 0, mantissa * 2.0**-9, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    magnitude[(codes & 0x7F) == 0x7F] = np.nan
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)


E4M3_TABLE = _e4m3_table()  # code -> float32; NaN at 0x7F and 0xFF


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 E4M3FN codes as float32 (NaN for 0x7F/0xFF)."""
    return E4M3_TABLE[codes]  # fancy indexing: ~3x faster than np.take here


_SUBNORMAL_MAGIC = np.float32(2.0**14)  # float32's spacing at 2^14 is 2^-9, e4m3's subnormal step


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """float32 to E4M3FN codes (uint8): round to nearest even, saturating at
    +-448; NaN becomes 0x7F (0xFF when negative)."""
    a = np.abs(np.asarray(x, dtype=np.float32))
    sign = np.signbit(x).view(np.uint8) << 7
    np.minimum(a, np.float32(E4M3_MAX), out=a)  # saturate; NaN stays NaN
    bits = a.view(np.uint32)
    # normal range: keep 3 of float32's 23 mantissa bits, rounding to nearest
    # even, then rebias the exponent from 127 to 7: code = (e - 120) << 3 | m
    codes = bits >> 20
    codes &= 1
    codes += bits
    codes += np.uint32(0x7FFFF)
    codes >>= 20
    codes -= np.uint32(120 << 3)  # wraps below 2^-6: those are replaced next
    np.minimum(codes, np.uint32(0x7F), out=codes)  # only NaN gets past 0x7E: it becomes 0x7F
    # below 2^-6: steps of 2^-9, rounded to nearest even by a float32 add at
    # 2^14; a code of 8 is exactly the smallest normal
    small = np.flatnonzero(a < np.float32(E4M3_MIN_NORMAL))
    if small.size:
        flat = codes.reshape(-1)
        flat[small] = (a.reshape(-1)[small] + _SUBNORMAL_MAGIC).view(np.uint32) - _SUBNORMAL_MAGIC.view(np.uint32)
    out = codes.astype(np.uint8)
    out |= sign
    return out


# ---------------------------------------------------------------- codecs


@dataclass(frozen=True)
class TensorSpec:
    """What one encoded tensor (keys or values) is made of."""

    codes: np.dtype  # shaped like the tensor, [kv_heads, tokens, head_dim]
    scales: np.dtype | None
    scales_shape: tuple[int, ...]

    def nbytes(self, shape: Shape) -> int:
        scales = math.prod(self.scales_shape) * self.scales.itemsize if self.scales is not None else 0
        return math.prod(shape) * self.codes.itemsize + scales


@dataclass(frozen=True)
class EncodedTensor:
    """One encoded tensor: its codes and (lossy codecs) its scales."""

    codes: np.ndarray
    scales: np.ndarray | None


class Codec(Protocol):
    """One way to put a tensor on the wire. Stateless."""

    name: str
    exact: bool  # decode gives back the sent bits (raw)

    def spec(self, shape: Shape, dtype: str) -> TensorSpec:
        """The dtypes and shapes of an encoded ``shape`` tensor of wire ``dtype``."""
        ...

    def encode(self, x: np.ndarray, dtype: str, tensor: str, layer: int | None) -> EncodedTensor:
        """Encode ``x`` (``[kv_heads, tokens, head_dim]``, wire ``dtype``);
        ``UnencodableKV`` naming ``tensor`` and ``layer`` if it cannot."""
        ...

    def decode(self, t: EncodedTensor) -> tuple[np.ndarray, float]:
        """The tensor as float32 (``exact``: as sent) and a bound on its
        magnitudes; ``ValueError`` for codes or scales the encoder never writes."""
        ...


class Raw:
    """The wire dtype's own bytes, bit-exact, NaN and inf included."""

    name = "raw"
    exact = True

    def spec(self, shape: Shape, dtype: str) -> TensorSpec:
        return TensorSpec(numpy_dtype(dtype), None, ())

    def encode(self, x: np.ndarray, dtype: str, tensor: str, layer: int | None) -> EncodedTensor:
        return EncodedTensor(np.ascontiguousarray(x), None)

    def decode(self, t: EncodedTensor) -> tuple[np.ndarray, float]:
        return t.codes, math.inf  # any bits: no bound


class Int8:
    """Symmetric int8, one float16 scale per head and token."""

    name = "int8"
    exact = False

    def spec(self, shape: Shape, dtype: str) -> TensorSpec:
        return TensorSpec(np.dtype(np.int8), np.dtype(np.float16), shape[:2])

    def encode(self, x: np.ndarray, dtype: str, tensor: str, layer: int | None) -> EncodedTensor:
        x32 = to_float32(x, dtype)  # [kv_heads, tokens, head_dim]
        amax = np.max(np.abs(x32), axis=-1, initial=0.0)  # [kv_heads, tokens]; NaN propagates
        _refuse_non_finite(self.name, x32, amax, tensor, layer)
        scales = _int8_scales(amax)
        if np.isinf(scales).any():
            head, token = np.argwhere(np.isinf(scales))[0]
            raise UnencodableKV(self.name, tensor, layer, int(head), int(token),
                                f"max|x| above {INT8_MAX} * {FP16_MAX:g} overflows its float16 scale")
        divisor = scales.astype(np.float32)
        divisor[divisor == 0] = 1.0  # an all-zero row stays 0
        q = x32 / divisor[..., None]  # [kv_heads, tokens, head_dim]
        np.rint(q, out=q)
        np.clip(q, -INT8_MAX, INT8_MAX, out=q)
        return EncodedTensor(q.astype(np.int8), scales)

    def decode(self, t: EncodedTensor) -> tuple[np.ndarray, float]:
        _check_scales(self.name, t.scales)
        if t.codes.size and t.codes.min() < -INT8_MAX:
            raise ValueError("int8 codes hold -128, which the encoder never writes")
        x = t.codes.astype(np.float32)
        x *= t.scales.astype(np.float32)[..., None]
        return x, INT8_MAX * float(t.scales.max(initial=0))


class Fp8:
    """OCP FP8 E4M3FN, one float32 scale per head."""

    name = "fp8"
    exact = False

    def spec(self, shape: Shape, dtype: str) -> TensorSpec:
        return TensorSpec(np.dtype(np.uint8), np.dtype(np.float32), shape[:1])

    def encode(self, x: np.ndarray, dtype: str, tensor: str, layer: int | None) -> EncodedTensor:
        x32 = to_float32(x, dtype)  # [kv_heads, tokens, head_dim]
        amax = np.max(np.abs(x32), axis=(1, 2), initial=0.0)  # [kv_heads]; NaN propagates
        _refuse_non_finite(self.name, x32, amax, tensor, layer)
        scales = _fp8_scales(amax)
        divisor = np.where(scales > 0, scales, np.float32(1.0))
        return EncodedTensor(e4m3_encode(x32 / divisor[:, None, None]), scales)

    def decode(self, t: EncodedTensor) -> tuple[np.ndarray, float]:
        _check_scales(self.name, t.scales)
        if t.codes.size and ((t.codes & 0x7F).max() == 0x7F):
            raise ValueError("fp8 codes hold the e4m3 NaN (0x7F/0xFF), which the encoder never writes")
        x = e4m3_decode(t.codes)
        x *= t.scales[:, None, None]
        return x, E4M3_MAX * float(t.scales.max(initial=0))


CODECS: dict[str, Codec] = {"raw": Raw(), "int8": Int8(), "fp8": Fp8()}


def check_codec(name: str) -> Codec:
    """The codec called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown KV codec {name!r}; known codecs: {', '.join(CODECS)}") from None


def _int8_scales(amax: np.ndarray) -> np.ndarray:
    """``max|x| / 127`` rounded up to a float16 (exactly: ``127 * scale >=
    max|x|``, so no code leaves [-127, 127]); inf where float16 overflows."""
    exact = amax.astype(np.float64)
    with np.errstate(over="ignore"):
        scales = (exact / INT8_MAX).astype(np.float16)
    low = scales.astype(np.float64) * INT8_MAX < exact  # exact: 11 x 7 significant bits
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    return scales


def _fp8_scales(amax: np.ndarray) -> np.ndarray:
    """``max|x| / 448`` per head as float32, at least float32's smallest
    normal (so ``x / scale`` never overflows), and small enough that ``448 *
    scale`` stays finite; 0 for an all-zero head."""
    scales = np.maximum(amax / np.float32(E4M3_MAX), np.float32(FLOAT32_MIN_NORMAL))
    with np.errstate(over="ignore"):
        overflow = ~np.isfinite(scales * np.float32(E4M3_MAX))
    scales[overflow] = np.nextafter(scales[overflow], np.float32(0))
    scales[amax == 0] = 0
    return scales.astype(np.float32)


def _refuse_non_finite(codec: str, x32: np.ndarray, amax: np.ndarray, tensor: str, layer: int | None) -> None:
    """``UnencodableKV`` at the first non-finite element of ``x32``; ``amax``
    (its max |x| per head, or per head and token) is non-finite exactly then."""
    if np.isfinite(amax).all():
        return
    bad = ~np.isfinite(x32)
    head, token, _ = np.argwhere(bad)[0]
    raise UnencodableKV(codec, tensor, layer, int(head), int(token),
                        f"{int(bad.sum())} non-finite value(s) ({x32[head, token][bad[head, token]][0]})")


def _check_scales(codec: str, scales: np.ndarray | None) -> None:
    if scales is None or not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError(f"{codec} scales must be finite and >= 0")


# ---------------------------------------------------------------- a slice


@dataclass(frozen=True)
class EncodedSlice:
    """One layer slice's keys and values under ``codec``: what goes on the
    wire plus the metadata a frame header carries (codec, wire dtype, shape)."""

    codec: str
    dtype: str  # the wire dtype the tensors had, and decode to by default
    shape: Shape  # [kv_heads, tokens, head_dim]
    keys: EncodedTensor
    values: EncodedTensor

    def __post_init__(self) -> None:
        spec = check_codec(self.codec).spec(self.shape, self.dtype)
        for name in ("keys", "values"):
            t: EncodedTensor = getattr(self, name)
            if t.codes.dtype != spec.codes or t.codes.shape != self.shape:
                raise ValueError(f"{self.codec} {name} codes must be {spec.codes} {self.shape}, "
                                 f"got {t.codes.dtype} {t.codes.shape}")
            want = None if spec.scales is None else (spec.scales, spec.scales_shape)
            got = None if t.scales is None else (t.scales.dtype, t.scales.shape)
            if got != want:
                raise ValueError(f"{self.codec} {name} scales must be {want}, got {got}")

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: codes and scales of keys and values."""
        return sum(len(b) for b in self.buffers())

    def buffers(self) -> list[memoryview]:
        """Byte views in wire order: key scales, value scales, key codes, value codes."""
        arrays = [self.keys.scales, self.values.scales, self.keys.codes, self.values.codes]
        return [memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)) for a in arrays if a is not None]

    @classmethod
    def from_buffer(cls, codec: str, dtype: str, shape: Shape, payload: bytes | bytearray | memoryview
                    ) -> EncodedSlice:
        """The slice whose ``buffers()`` joined are ``payload``: views, no copy."""
        if len(shape) != 3 or any(type(n) is not int or n < 0 for n in shape):
            raise ValueError(f"a slice's shape is [kv_heads, tokens, head_dim], got {shape!r}")
        shape = (shape[0], shape[1], shape[2])
        spec = check_codec(codec).spec(shape, dtype)
        view = memoryview(payload).cast("B")
        if len(view) != 2 * spec.nbytes(shape):
            raise ValueError(f"a {codec} {dtype} slice shaped {list(shape)} is {2 * spec.nbytes(shape)} "
                             f"bytes, got {len(view)}")
        offset = 0

        def take(dtype_: np.dtype, shape_: tuple[int, ...]) -> np.ndarray:
            nonlocal offset
            count = math.prod(shape_)
            array = np.frombuffer(view, dtype_, count, offset).reshape(shape_)
            offset += count * dtype_.itemsize
            return array

        scales = [take(spec.scales, spec.scales_shape) for _ in range(2)] if spec.scales is not None else [None, None]
        keys, values = take(spec.codes, shape), take(spec.codes, shape)
        return cls(codec, dtype, shape, EncodedTensor(keys, scales[0]), EncodedTensor(values, scales[1]))


def encode(codec: str, keys: np.ndarray, values: np.ndarray, dtype: str, *,
           layer: int | None = None) -> EncodedSlice:
    """Encode one slice's ``keys`` and ``values`` (``[kv_heads, tokens,
    head_dim]`` arrays of ``numpy_dtype(dtype)``). ``UnencodableKV`` (a
    ``ValueError``) for what a lossy codec refuses; ``layer`` only names it."""
    c = check_codec(codec)
    expected = numpy_dtype(dtype)
    if keys.ndim != 3 or keys.shape != values.shape:
        raise ValueError(f"keys and values must both be [kv_heads, tokens, head_dim], got "
                         f"{keys.shape} and {values.shape}")
    if keys.dtype != expected or values.dtype != expected:
        raise ValueError(f"{dtype} KV travels as {expected}, got {keys.dtype} and {values.dtype}")
    shape: Shape = tuple(int(n) for n in keys.shape)  # type: ignore[assignment]
    return EncodedSlice(codec, dtype, shape, c.encode(keys, dtype, "keys", layer),
                        c.encode(values, dtype, "values", layer))


def encode_slice(codec: str, kv_slice: KVSlice) -> EncodedSlice:
    """``encode`` a ``KVSlice``, naming its layer in any refusal."""
    return encode(codec, kv_slice.keys, kv_slice.values, kv_slice.dtype, layer=kv_slice.layer)


def decode(encoded: EncodedSlice, dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values in wire ``dtype`` (default: the one they were encoded
    from; bf16 as uint16 bit patterns). A receiving engine may ask for its own
    compute dtype and skip a cast."""
    dtype = encoded.dtype if dtype is None else dtype
    numpy_dtype(dtype)
    c = check_codec(encoded.codec)
    return tuple(_decode_tensor(c, t, encoded.dtype, dtype) for t in (encoded.keys, encoded.values))  # type: ignore[return-value]


def _decode_tensor(c: Codec, t: EncodedTensor, sent: str, wanted: str) -> np.ndarray:
    x, max_abs = c.decode(t)
    if not c.exact:
        return from_float32(x, wanted, max_abs)
    if sent == wanted:
        return x
    x32 = to_float32(x, sent)
    return from_float32(x32.copy() if x32 is x else x32, wanted)  # any bits: cast as torch does


def encoded_nbytes(codec: str, kv_heads: int, tokens: int, head_dim: int, dtype: str) -> int:
    """Bytes one slice of keys and values takes on the wire under ``codec``."""
    shape = (kv_heads, tokens, head_dim)
    return 2 * check_codec(codec).spec(shape, dtype).nbytes(shape)
