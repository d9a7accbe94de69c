"""What the scheduler knows about each served model, learned from the workers.

A worker's Info carries its model's tokenizer, chat template, context length,
EOS ids and ``config.json``; no weights are loaded here, so the scheduler runs
on a NAS or a Pi. The first node seen for a model teaches the registry; later
nodes of the same model change nothing.

NOTE on "the same model". Nodes advertising one model id are paired: one
prefills, the other decodes from its KV. A node's checkpoint need not be
byte-identical to the teacher's: a decode node may serve mlx-lm's 4- or
8-bit copy of a bf16 prefill node's model under the base model's id
(``workers/tools/quantize.py``, ``workers/rpc/info.py``). What must agree is
what the KV handoff and the token ids depend on, ``SAME_MODEL_FIELDS``: the
architecture, the layer count, the KV heads, the head dim and the
vocabulary, and, from config.json, each layer's sliding window. Each (model id, weights fingerprint) pair is judged once against
the teacher (a node with the teacher's fingerprint has its config.json, so
it passes unasked); a node that differs is refused with the field named
(``problem``), and must not be placed (``accepts``). Prefix-cache hashes stay
rooted in each node's own fingerprint (``scheduler/service.py``,
``prefix_cached_tokens``), so a quantized copy and its base share the model
id but never a cached block.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from scheduler.costmodel import layer_windows
from scheduler.request import ModelEntry
from scheduler.tokenizer import PromptCodec, TokenizerBundle

log = logging.getLogger(__name__)

# fetch_info(node) -> the node's Info reply; raises on failure
FetchInfo = Callable[[NodeInfo], Awaitable[pb.InfoReply]]

# The ModelInfo fields two nodes of one model id must agree on (see the NOTE
# above); workers/tools/quantize.py checks the same fields of two folders.
SAME_MODEL_FIELDS: tuple[str, ...] = ("model_type", "num_layers", "kv_heads", "head_dim", "vocab_size")


@dataclass(frozen=True)
class ModelRecord:
    """One model: its API entry, its tokenizer and chat template, its config.json (None if unreadable),
    and the ``SAME_MODEL_FIELDS`` of the node that taught it (``source``)."""

    entry: ModelEntry
    codec: PromptCodec
    config: dict | None
    shape: dict[str, object] = field(default_factory=dict)
    source: str = ""
    dtype: str = ""  # the teaching node's engine dtype (its KV's wire dtype), "" unknown


def model_shape(model: pb.ModelInfo) -> dict[str, object]:
    """``model``'s ``SAME_MODEL_FIELDS``, by name."""
    return {name: getattr(model, name) for name in SAME_MODEL_FIELDS}


def model_mismatch(record: ModelRecord, model: pb.ModelInfo) -> str | None:
    """Why a node serving ``model`` under ``record``'s id is not the same model,
    naming the first field that differs; None when it is (its weights, their
    quantization and its dtype may differ)."""
    for name, want in record.shape.items():
        got = getattr(model, name)
        if got != want:
            return (f"{name} is {got!r} there but {want!r} on node {record.source or '?'}, which taught "
                    f"model {record.entry.model_id!r}")
    if record.config is not None:  # the KV layouts must agree layer by layer, sliding windows included
        want_windows = _windows(record.config, model.num_layers)
        got_windows = _windows(_config_of(model, "the node"), model.num_layers)
        if got_windows is not None and want_windows is not None and got_windows != want_windows:
            return (f"sliding windows per layer are {list(got_windows)} there but {list(want_windows)} on node "
                    f"{record.source or '?'}, which taught model {record.entry.model_id!r}")
    return None


def _windows(config: dict | None, num_layers: int) -> tuple[int | None, ...] | None:
    """Each layer's sliding window of ``config`` (None: full), or None when unreadable."""
    if config is None:
        return None
    try:
        return layer_windows(config, num_layers)
    except (ValueError, TypeError):
        return None


def record_from_info(model: pb.ModelInfo, source: str = "") -> ModelRecord:
    """The ``ModelRecord`` an Info reply's model describes; ``source`` names the node for warnings."""
    bundle = TokenizerBundle(model.tokenizer_json, model.chat_template, model.bos_token, model.eos_token)
    entry = ModelEntry(model.model_id, model.max_position_embeddings, tuple(model.eos_token_ids))
    return ModelRecord(entry, PromptCodec(bundle), _config_of(model, source), model_shape(model), source,
                       model.dtype)


def _config_of(model: pb.ModelInfo, source: str) -> dict | None:
    config = None
    try:
        config = json.loads(model.config_json) if model.config_json else None
    except ValueError as e:
        log.warning("model %s: %s sent an unreadable config.json (%s); cost-model policies cannot place it",
                    model.model_id, source, e)
    if config is None:
        log.warning("model %s: no config.json from %s; cost-model policies (conditional, roofline) "
                    "cannot place it", model.model_id, source)
    return config


class ModelRegistry:
    """Model id -> ``ModelRecord``, filled from the first node that serves each model;
    and which checkpoints served under a model's id are the same model (the NOTE above)."""

    def __init__(self, fetch_info: FetchInfo) -> None:
        self.fetch_info = fetch_info
        self._records: dict[str, ModelRecord] = {}
        # (model id, weights fingerprint) -> why it is not the model's id's model; None: it is
        self._verdicts: dict[tuple[str, str], str | None] = {}
        self._tasks: set[asyncio.Task] = set()  # fetches in flight (held, so none is collected mid-flight)

    def knows(self, model_id: str) -> bool:
        """Whether ``model_id``'s tokenizer and config are here."""
        return model_id in self._records

    def record(self, model_id: str) -> ModelRecord | None:
        """``model_id``'s record, or None if no node has taught it yet."""
        return self._records.get(model_id)

    def config_for(self, model_id: str) -> dict | None:
        """``model_id``'s config.json, or None if unknown or unreadable."""
        record = self._records.get(model_id)
        return record.config if record else None

    def entries(self, model_ids: Iterable[str]) -> list[ModelEntry]:
        """The known models among ``model_ids``, sorted by id."""
        wanted = set(model_ids)
        return [r.entry for model_id, r in sorted(self._records.items()) if model_id in wanted]

    def add(self, record: ModelRecord) -> None:
        """Keep ``record`` unless its model is already known (the first node seen wins)."""
        self._records.setdefault(record.entry.model_id, record)

    def problem(self, node: NodeInfo) -> str | None:
        """Why ``node`` is refused: it serves another model under its model id
        (the message names the field); None when accepted or not judged yet."""
        return self._verdicts.get((node.model_id, node.weights_fingerprint))

    def accepts(self, node: NodeInfo) -> bool:
        """Whether ``node`` may be placed for its model id (not refused by ``problem``)."""
        return self.problem(node) is None

    def refused(self, nodes: Iterable[NodeInfo]) -> dict[str, str]:
        """Node id -> why, for those of ``nodes`` that are refused."""
        return {n.node_id: why for n in nodes if (why := self.problem(n)) is not None}

    def learn_soon(self, node: NodeInfo) -> None:
        """Fetch ``node``'s model in the background unless its checkpoint was
        judged already (needs a running loop)."""
        if (node.model_id, node.weights_fingerprint) in self._verdicts:
            return
        task = asyncio.get_running_loop().create_task(self.learn(node))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def learn(self, node: NodeInfo) -> None:
        """Fetch tokenizer, chat template and config for ``node``'s model from the
        node itself: the first node of a model teaches it, every later
        checkpoint is judged against it."""
        try:
            info = await self.fetch_info(node)
        except Exception as e:
            log.warning("could not fetch model info from %s: %s", node.node_id, e)
            return
        m = info.model
        record = record_from_info(m, node.node_id)
        self.add(record)
        known = self._records[m.model_id]
        problem = None if known is record else model_mismatch(known, m)
        self._verdicts[(node.model_id, node.weights_fingerprint)] = problem
        if problem is not None:
            log.warning("refusing node %s: it serves model %r, but not the same model: %s", node.node_id,
                        m.model_id, problem)
        elif known is record:
            log.info("model %s: %s, %d layers, context %d (tokenizer from %s)", m.model_id, m.model_type,
                     m.num_layers, m.max_position_embeddings, node.node_id)
        else:
            log.info("model %s: node %s serves other weights (fingerprint %s) of the same model", m.model_id,
                     node.node_id, node.weights_fingerprint)

    async def stop(self) -> None:
        """Cancel the fetches in flight."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
