"""What a worker tells the scheduler about itself: its model and its node.

The scheduler loads no weights (it must run on a NAS or a Raspberry Pi), so
``ModelInfo`` carries the whole ``tokenizer.json``, the chat template, the
``config.json`` its cost model reads (layers, heads, experts, weight format), and a
fingerprint that two workers agree on exactly when they serve the same
checkpoint (config plus weight files' names and sizes, not their contents,
which would take minutes to hash for a large model).

The model id and the fingerprint answer two questions. The id says which
model a node serves: nodes with one id are paired, and a quantized decode
copy (``workers/tools/quantize.py``) reports the base model id its sidecar
declares, so a bf16 prefill node and a 4-bit decode node serve one model.
The fingerprint says which exact weights compute the KV: prefix-cache block
hashes are rooted in it (``cluster/blocks.py``), so a quantized copy and its
full-precision base never share cached KV.
"""
from __future__ import annotations

import hashlib
import json
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


QUANTIZED_FILE = "pdcluster-quantized.json"  # written by workers/tools/quantize.py (tests check they agree)


def served_model_id(model_dir: Path, model_id: str | None = None) -> str:
    """The id a worker serves ``model_dir`` under: ``model_id`` when given
    (``pdc worker --model-id``), else the base model id a quantized copy's
    sidecar declares, else the folder's name."""
    if model_id:
        return model_id
    declared = _read_json(model_dir / QUANTIZED_FILE).get("base_model_id")
    return declared if isinstance(declared, str) and declared else model_dir.name


def model_info(model_dir: Path, spec: ModelSpec, engine: Engine, model_id: str | None = None) -> pb.ModelInfo:
    """The ``ModelInfo`` a worker serving ``model_dir`` on ``engine`` reports
    (its id: ``served_model_id``)."""
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    template_file = model_dir / "chat_template.jinja"
    chat_template = tokenizer_config.get("chat_template") or (
        template_file.read_text() if template_file.is_file() else ""
    )
    tokenizer_file = model_dir / "tokenizer.json"
    return pb.ModelInfo(
        model_id=served_model_id(model_dir, model_id),
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
