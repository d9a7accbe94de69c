"""What the scheduler knows about each served model, learned from the workers.

A worker's Info carries its model's tokenizer, chat template, context length,
EOS ids and ``config.json``; no weights are loaded here, so the scheduler runs
on a NAS or a Pi. The first node seen for a model teaches the registry; later
nodes of the same model change nothing.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from cluster.node import NodeInfo
from proto import pdcluster_pb2 as pb
from scheduler.request import ModelEntry
from scheduler.tokenizer import PromptCodec, TokenizerBundle

log = logging.getLogger(__name__)

# fetch_info(node) -> the node's Info reply; raises on failure
FetchInfo = Callable[[NodeInfo], Awaitable[pb.InfoReply]]


@dataclass(frozen=True)
class ModelRecord:
    """One model: its API entry, its tokenizer and chat template, its config.json (None if unreadable)."""

    entry: ModelEntry
    codec: PromptCodec
    config: dict | None


def record_from_info(model: pb.ModelInfo, source: str = "") -> ModelRecord:
    """The ``ModelRecord`` an Info reply's model describes; ``source`` names the node for warnings."""
    bundle = TokenizerBundle(model.tokenizer_json, model.chat_template, model.bos_token, model.eos_token)
    entry = ModelEntry(model.model_id, model.max_position_embeddings, tuple(model.eos_token_ids))
    return ModelRecord(entry, PromptCodec(bundle), _config_of(model, source))


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
    """Model id -> ``ModelRecord``, filled from the first node that serves each model."""

    def __init__(self, fetch_info: FetchInfo) -> None:
        self.fetch_info = fetch_info
        self._records: dict[str, ModelRecord] = {}
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

    def learn_soon(self, node: NodeInfo) -> None:
        """Fetch ``node``'s model in the background if it is not known yet (needs a running loop)."""
        if self.knows(node.model_id):
            return
        task = asyncio.get_running_loop().create_task(self.learn(node))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def learn(self, node: NodeInfo) -> None:
        """Fetch tokenizer, chat template and config for ``node``'s model from the node itself."""
        try:
            info = await self.fetch_info(node)
        except Exception as e:
            log.warning("could not fetch model info from %s: %s", node.node_id, e)
            return
        m = info.model
        self.add(record_from_info(m, node.node_id))
        log.info("model %s: %s, %d layers, context %d (tokenizer from %s)", m.model_id, m.model_type,
                 m.num_layers, m.max_position_embeddings, node.node_id)

    async def stop(self) -> None:
        """Cancel the fetches in flight."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
