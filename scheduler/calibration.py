"""What served requests teach the cost model: per-node corrections learned live.

A node's start-up probe times the served model's prefill alone, with its
slices dropped (``workers/rpc/profile.py``). A served prefill differs: it
streams every slice (the checksum on the engine thread, the sender thread's
encode and socket work on the same cores), it runs under whatever else the
machine is doing by then, and the request pays fixed costs around it (RPC
hops, the scheduler, the first token's trip). ``pdc bench link`` measured
all three: on a loaded 2-vCPU host served prefills ran up to 1.6x the probe's
figure, on a quiet one a lossy codec's encode overlapped the prefill and cost
a fraction of the cost model's prior, and 10-80 ms of TTFT lay outside queue,
prefill and exposed transfer.

So the scheduler compares each finished request with the cost model and keeps,
per node:

* ``prefill_scale[mode]``: the median, over the node's last ``window``
  prefills in that mode (of the last ``max_age_s``; used once ``min_samples``
  back it), of served prefill seconds / the cost model's compute seconds for
  the same prompt and cached prefix (``Predictor.compute_s``: the probe's
  pricing, before any correction); and the same per length band
  (``prefill_points``: a band per factor of two in prompt length, used once
  two bands each have ``min_samples``), since a node's ratio can change with
  length.
  Modes are ``local`` (colocated: the KV stays) and the codec a remote
  prefill streamed in (``raw``, ``int8``, ``fp8``). Prefills the model
  prices under ``min_compute_s`` are too short to time against it and are
  not counted, nor one that found a different cached prefix than placement
  assumed (``Dispatcher.served``), nor a node's first prefill in each mode
  (cold: one-time costs, not its pace).
* ``overhead_s[kind]``: the median, over the node's last ``window`` requests
  it decoded, colocated or disaggregated, of TTFT less queue (the worker's and
  the admission queue's), prefill and exposed transfer.

``costmodel.Served`` carries them into ``with_probe``, the one rule the live
``Predictor`` and the simulator share; a cluster file declares the same
figures to the simulator (``pdc bench link`` copies them from ``/health``).
Only a request's first attempt teaches (a re-placed or migrated request's
times span several placements). ``pdc serve --no-calibrate`` turns it off.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from scheduler import costmodel

WINDOW = 16  # requests per (node, mode) whose median is the figure
MIN_SAMPLES = 3  # a figure applies once this many requests back it (one slow request is not a slow node)
MAX_AGE_S = 600.0  # a sample older than this is dropped: a node avoided since then returns to its probe's price
MIN_COMPUTE_S = 0.01  # predicted compute below this is not timed against the model
SCALE_RANGE = (0.2, 5.0)  # a ratio outside this is a broken measurement, not a slow node


@dataclass(frozen=True)
class Observation:
    """One finished request, as the calibration reads it."""

    prefill_node: str
    decode_node: str
    mode: str  # costmodel.PREFILL_MODES: "local" when colocated, else the codec the KV crossed in
    compute_s: float  # the cost model's uncorrected compute seconds for this prefill
    prefill_s: float  # served: the prefill node's compute seconds
    ttft_s: float
    queue_s: float  # the worker's queue and the admission queue
    exposed_s: float  # prefill end -> last KV byte landed (0 colocated)
    num_tokens: int = 0  # the tokens this prefill computed (prompt less its cached prefix); 0 unknown

    @property
    def colocated(self) -> bool:
        return self.mode == "local"


class ServedCalibration:
    """Per-node ``costmodel.Served`` figures from the requests the scheduler finished."""

    def __init__(self, *, window: int = WINDOW, min_samples: int = MIN_SAMPLES, max_age_s: float = MAX_AGE_S,
                 min_compute_s: float = MIN_COMPUTE_S, enabled: bool = True, skip_cold: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= min_samples <= window or min_compute_s < 0 or max_age_s <= 0:
            raise ValueError(f"need 1 <= min_samples <= window, min_compute_s >= 0 and max_age_s > 0; got "
                             f"{min_samples}, {window}, {min_compute_s}, {max_age_s}")
        self.window, self.min_samples, self.max_age_s = window, min_samples, max_age_s
        self.min_compute_s, self.enabled, self.skip_cold, self.clock = min_compute_s, enabled, skip_cold, clock
        # (node, mode) -> (when, (ratio, tokens)); (node, kind) -> (when, seconds)
        self._scales: dict[tuple[str, str], deque[tuple[float, tuple[float, int]]]] = {}
        self._overheads: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._cold: set[tuple[str, str]] = set()  # (node, mode) whose first, cold prefill was set aside

    def observe(self, seen: Observation) -> None:
        """Learn from one finished request (nothing when disabled, or for figures that are not times)."""
        if not self.enabled or seen.mode not in costmodel.PREFILL_MODES:
            return
        times = (seen.compute_s, seen.prefill_s, seen.ttft_s, seen.queue_s, seen.exposed_s)
        if not all(math.isfinite(t) and t >= 0 for t in times):
            return
        if seen.compute_s >= self.min_compute_s and seen.prefill_s > 0:
            ratio = seen.prefill_s / seen.compute_s
            if not SCALE_RANGE[0] <= ratio <= SCALE_RANGE[1]:
                return  # a broken measurement: its TTFT says nothing either
            key = (seen.prefill_node, seen.mode)
            if self.skip_cold and key not in self._cold:  # a node's first prefill in a mode: one-time costs
                self._cold.add(key)
            else:
                self._add(self._scales, key, (ratio, seen.num_tokens))
        if seen.ttft_s > 0 and seen.prefill_s > 0:
            kind = "colocated" if seen.colocated else "disaggregated"
            rest = seen.ttft_s - seen.queue_s - seen.prefill_s - seen.exposed_s
            self._add(self._overheads, (seen.decode_node, kind), max(0.0, rest))

    def served(self, node_id: str) -> costmodel.Served | None:
        """What ``node_id``'s recent requests measured, each figure once ``min_samples`` back it;
        None before that (or when disabled)."""
        if not self.enabled:
            return None
        ready = [(mode, v) for mode, v in self._figures(self._scales, node_id) if len(v) >= self.min_samples]
        scales = tuple((mode, statistics.median(ratio for ratio, _ in v)) for mode, v in ready)
        points = tuple((mode, p) for mode, v in ready if len(p := length_points(v, self.min_samples)) >= 2)
        overheads = tuple((kind, statistics.median(v)) for kind, v in self._figures(self._overheads, node_id)
                          if len(v) >= self.min_samples)
        return costmodel.Served(scales, overheads, points) if scales or overheads else None

    def forget(self, node_id: str) -> None:
        """``node_id`` left (or restarted): what it measured no longer applies."""
        for table in (self._scales, self._overheads):
            for key in [k for k in table if k[0] == node_id]:
                del table[key]
        self._cold = {key for key in self._cold if key[0] != node_id}

    def snapshot(self, node_id: str) -> dict:
        """``/health``'s ``served`` object of one node: the figures in use (as ``served``), and how many
        recent requests back each key, those still short of ``min_samples`` included."""
        served = self.served(node_id) or costmodel.Served()
        return {
            "prefill_scale": {mode: round(value, 4) for mode, value in served.prefill_scale},
            "prefill_points": {mode: [[n, round(f, 4)] for n, f in p] for mode, p in served.prefill_points},
            "overhead_s": {kind: round(value, 4) for kind, value in served.overhead_s},
            "samples": {f"{what}:{key}": len(v) for what, table in (("prefill", self._scales),
                                                                     ("overhead", self._overheads))
                        for key, v in self._figures(table, node_id)},
            "min_samples": self.min_samples,
            "enabled": self.enabled,
        }

    def _figures(self, table: dict[tuple[str, str], deque], node_id: str) -> list[tuple[str, list]]:
        """``node_id``'s keys in ``table`` with their values younger than ``max_age_s`` (older ones dropped)."""
        oldest = self.clock() - self.max_age_s
        out = []
        for (node, key), samples in sorted(table.items()):
            if node != node_id:
                continue
            while samples and samples[0][0] < oldest:
                samples.popleft()
            if samples:
                out.append((key, [value for _, value in samples]))
        return out

    def _add(self, table: dict[tuple[str, str], deque], key: tuple[str, str], value: object) -> None:
        table.setdefault(key, deque(maxlen=self.window)).append((self.clock(), value))


def length_points(samples: list[tuple[float, int]], min_samples: int = 1) -> tuple[tuple[int, float], ...]:
    """(ratio, tokens) samples as ``Served.prefill_points``: one point per length band (a
    factor of two, ``round(log2(tokens))``) that ``min_samples`` back, at the band's median
    tokens with its median ratio, ascending; samples of unknown length (0 tokens) count only
    in the overall figure."""
    bands: dict[int, list[tuple[float, int]]] = {}
    for ratio, tokens in samples:
        if tokens > 0:
            bands.setdefault(round(math.log2(tokens)), []).append((ratio, tokens))
    points = [(int(statistics.median(n for _, n in band)), statistics.median(r for r, _ in band))
              for _, band in sorted(bands.items()) if len(band) >= min_samples]
    return tuple(points)  # bands are disjoint length ranges: their medians ascend
