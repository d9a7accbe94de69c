"""Quantized decode copies: mlx-lm's own 4- or 8-bit quantization of a checkpoint, declaring its base model.

People prefill in bf16 on an NVIDIA box and decode with MLX 4-bit or 8-bit
weights on a Mac. ``quantize_checkpoint`` writes such a copy with mlx-lm's
converter (what ``mlx_lm.convert -q`` runs, called through
``workers/engines/mlx_engine.py``, the one module that imports mlx-lm; no
quantization code of ours) and records the base model in a sidecar,
``pdcluster-quantized.json``.

Invariants of a copy written here:

* ``pdcluster-quantized.json`` names the base model id (by default the base
  folder's name, the id a worker serving that folder reports). A worker
  serving the copy reports that id as its model id (``workers/rpc/info.py``),
  so the scheduler pairs a full-precision prefill node with a quantized decode
  node. Its weights fingerprint stays its own (config.json and weight files
  differ), so prefix-cache block hashes, rooted in it, are never shared with
  the full-precision copy: their KV differs.
* Its architecture, layers, KV heads, head dim and vocabulary equal the base's
  (``check_same_model``, the fields the scheduler compares:
  ``scheduler/models.py``, ``SAME_MODEL_FIELDS``).
* Its tokenizer files are the base's, byte for byte. mlx-lm re-saves them
  through transformers, which may add a post-processor; the cluster must
  tokenize alike on every node of one model id.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path

from cluster.paths import cache_dir
from workers.engines.model_config import ModelSpec, load_config, read_model_spec
from workers.tools.builtin import exclusive

QUANTIZED_FILE = "pdcluster-quantized.json"  # read by workers/rpc/info.py (tests check they agree)
BITS: tuple[int, ...] = (4, 8)
DEFAULT_GROUP_SIZE = 64  # mlx-lm's default for affine quantization
# What makes two checkpoints one model for the KV handoff; the scheduler's rule
# (scheduler/models.py, SAME_MODEL_FIELDS) compares the same fields of Info.
SAME_MODEL_FIELDS: tuple[str, ...] = ("model_type", "num_layers", "kv_heads", "head_dim", "vocab_size")
# Files that make up a tokenizer and its chat template; the base's replace mlx-lm's re-saved ones.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class ModelMismatchError(ValueError):
    """Two checkpoints are not the same model for the KV handoff; the message names the field."""


def check_bits(bits: int) -> int:
    """``bits`` if mlx-lm quantizes to it here (4 or 8); ``ValueError`` otherwise."""
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {list(BITS)}, got {bits!r}")
    return bits


def check_same_model(base: ModelSpec, other: ModelSpec, where: str = "the quantized copy") -> None:
    """Raise ``ModelMismatchError`` naming the first of ``SAME_MODEL_FIELDS``
    on which ``other`` differs from ``base``."""
    for name in SAME_MODEL_FIELDS:
        mine, theirs = getattr(base, name), getattr(other, name)
        if mine != theirs:
            raise ModelMismatchError(f"{where} is not the same model: {name} is {theirs!r} there but {mine!r} "
                                     f"in the base model")


def quantization_of(model_dir: str | Path) -> dict | None:
    """The ``quantization`` block mlx-lm wrote into ``config.json``, else a checkpoint's own
    ``quantization_config`` method (gpt-oss's ``{"quant_method": "mxfp4"}``); None for
    full-precision weights."""
    config = load_config(model_dir)
    block = config.get("quantization")
    if isinstance(block, dict):
        return block
    native = config.get("quantization_config")
    if isinstance(native, dict) and native.get("quant_method"):
        return {"quant_method": native["quant_method"]}
    return None


def declared_base(model_dir: str | Path) -> dict | None:
    """The sidecar of a copy written by ``quantize_checkpoint``; None for any other folder."""
    path = Path(model_dir) / QUANTIZED_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, bits: int,
                        group_size: int = DEFAULT_GROUP_SIZE, base_model_id: str | None = None) -> Path:
    """Write mlx-lm's ``bits``-bit copy of ``model_dir`` into ``out_dir`` (which
    must not exist) and declare ``base_model_id`` (default: ``model_dir``'s
    folder name) as its base model. Built in a temporary sibling folder and
    renamed into place, so ``out_dir`` is whole or absent. Returns ``out_dir``."""
    check_bits(bits)
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128 (mlx-lm's choices), got {group_size}")
    src, out = Path(model_dir), Path(out_dir)
    base = read_model_spec(src)  # refuses an unsupported architecture before any work
    if quantization_of(src) is not None:
        raise ValueError(f"{src} is already quantized ({quantization_of(src)}); quantize the full-precision model")
    if out.exists():
        raise FileExistsError(f"{out} exists; quantize_checkpoint writes a new folder")
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        from workers.engines.mlx_engine import write_quantized

        write_quantized(src, tmp, bits, group_size)
        _copy_tokenizer(src, tmp)
        check_same_model(base, read_model_spec(tmp), str(out))
        sidecar = {"base_model_id": base_model_id or src.name or src.resolve().name,  # served_model_id's folder name "bits": bits, "group_size": group_size,
                   "mode": "affine", "quantized_by": f"mlx-lm {metadata.version('mlx-lm')}",
                   "base_folder": str(src.resolve())}
        (tmp / QUANTIZED_FILE).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_quantized(model_dir: str | Path, bits_or_folder: str) -> Path:
    """The quantized copy ``check-handoff --quantized-decode`` measures: for
    ``"4"`` or ``"8"``, mlx-lm's copy of ``model_dir`` from the cache
    (``cached_quantized``); otherwise the folder named, which must hold
    mlx-lm-quantized weights (made here or by ``mlx_lm.convert -q``)."""
    if bits_or_folder.isdigit():
        return cached_quantized(model_dir, check_bits(int(bits_or_folder)))
    folder = Path(bits_or_folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"--quantized-decode {bits_or_folder!r}: neither 4, 8 nor a model folder")
    if quantization_of(folder) is None:
        raise ValueError(f"{folder} holds full-precision weights (no 'quantization' in its config.json); "
                         f"make a quantized copy with pdc make-model --quantize or mlx_lm.convert -q")
    return folder


def quantized_sibling(model_dir: str | Path, bits: int) -> Path:
    """Where ``pdc make-model DIR --quantize BITS`` puts the copy: ``DIR-q4`` or ``DIR-q8`` beside ``DIR``."""
    folder = Path(model_dir)
    return folder.with_name(f"{folder.name}-q{check_bits(bits)}")


def make_quantized_sibling(model_dir: str | Path, bits: int) -> Path:
    """``quantize_checkpoint`` into ``quantized_sibling``, replacing a copy made
    there before (one with the sidecar; any other folder is refused)."""
    out = quantized_sibling(model_dir, bits)
    if out.exists():
        if declared_base(out) is None:
            raise FileExistsError(f"{out} exists and is not a quantized copy made by pdcluster; move it away")
        shutil.rmtree(out)
    return quantize_checkpoint(model_dir, out, bits)


def cached_quantized(model_dir: str | Path, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    """A ``bits``-bit copy of ``model_dir`` in pdcluster's cache, made on first
    use (under a file lock, so two processes make it once). The cache key covers
    the folder's path, its config and its weight files' names, sizes and
    modification times: a rebuilt base gets a new copy."""
    src = Path(model_dir).resolve()
    digest = hashlib.sha256(str(src).encode())
    digest.update((src / "config.json").read_bytes())
    for weights in sorted(src.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    root = cache_dir() / "quantized"
    out = root / f"{src.name}-{digest.hexdigest()[:12]}-q{check_bits(bits)}g{group_size}"
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / f".{out.name}.lock"):
        if not (out / QUANTIZED_FILE).is_file():
            shutil.rmtree(out, ignore_errors=True)  # a partial folder from an older layout
            quantize_checkpoint(src, out, bits, group_size)
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Replace ``dst``'s tokenizer files with ``src``'s."""
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
