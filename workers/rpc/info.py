"""What a worker tells the scheduler about itself: its model and its node.

The scheduler loads no weights (it must run on a NAS or a Raspberry Pi), so
``ModelInfo`` carries the whole ``tokenizer.json``, the chat template, the
``config.json`` its cost model reads (layers, heads, experts, weight format), and a
fingerprint that two workers agree on exactly when they serve the same
checkpoint (config plus weight files' names and sizes, not their contents,
which would take minutes to hash for a large model).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from proto import pdcluster_pb2 as pb
from workers.engines.base import Engine
from workers.engines.model_config import ModelSpec


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json, the safetensors index and each weight file's
    name and size; 16 hex digits."""
    digest = hashlib.sha256()
    digest.update((model_dir / "config.json").read_bytes())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        digest.update(index.read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def model_info(model_dir: Path, spec: ModelSpec, engine: Engine, model_id: str | None = None) -> pb.ModelInfo:
    """The ``ModelInfo`` a worker serving ``model_dir`` on ``engine`` reports."""
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    template_file = model_dir / "chat_template.jinja"
    chat_template = tokenizer_config.get("chat_template") or (
        template_file.read_text() if template_file.is_file() else ""
    )
    tokenizer_file = model_dir / "tokenizer.json"
    return pb.ModelInfo(
        model_id=model_id or model_dir.name,
        fingerprint=model_fingerprint(model_dir),
        model_type=spec.model_type,
        num_layers=spec.num_layers,
        kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        dtype=engine.layout_dtype,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        eos_token_ids=list(spec.eos_token_ids),
        tokenizer_json=tokenizer_file.read_text() if tokenizer_file.is_file() else "",
        chat_template=chat_template if isinstance(chat_template, str) else "",
        bos_token=_token_text(tokenizer_config.get("bos_token")),
        eos_token=_token_text(tokenizer_config.get("eos_token")),
        config_json=(model_dir / "config.json").read_text(),
    )


def free_memory_bytes(device: str = "") -> int:
    """Memory free for KV on ``device``, or 0 where the platform does not say.

    A CUDA device reports its own free memory (the KV lives there, not in host
    RAM). Elsewhere it is the host's: Linux's available pages, and on macOS
    (unified memory, where MLX allocates) free + inactive + speculative pages
    from ``vm_stat``, since ``SC_AVPHYS_PAGES`` does not exist there."""
    if device.startswith("cuda"):
        try:
            import torch

            index = torch.device(device).index
            return int(torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())[0])
        except Exception:  # no torch or no CUDA context: fall back to the host figure
            pass
    if sys.platform == "darwin":
        return _darwin_free_bytes()
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _darwin_free_bytes() -> int:
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=2, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return parse_vm_stat(out)


def parse_vm_stat(text: str) -> int:
    """Bytes free, inactive or speculative in macOS ``vm_stat`` output (0 if unreadable)."""
    page = re.search(r"page size of (\d+) bytes", text)
    if page is None:
        return 0
    pages = 0
    for name in ("Pages free", "Pages inactive", "Pages speculative"):
        found = re.search(rf"^{name}:\s+(\d+)\.", text, re.MULTILINE)
        pages += int(found.group(1)) if found else 0
    return pages * int(page.group(1))


def pdcluster_version() -> str:
    try:
        return metadata.version("pdcluster")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str:
    """Tokenizer configs store special tokens as text or as {"content": text}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
