"""The worker's step loop (workers/rpc/loop.py) over a fake engine, CPU only.

The fake engine's token for a request at step k is a pure function of
(request id, k), so every stream's expected tokens are known whatever the
batch around it does; it also records each step's batch, so the tests can
see who ran together.
"""
from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Generator

import pytest

from workers.engines.base import is_last
from workers.engines.sampling import SamplingParams
from workers.engines.thread import EngineThread
from workers.rpc.loop import LoopClosed, StepLoop, StreamCancelled

TIMEOUT_S = 10.0
VOCAB = 1000


def token_at(request_id: str, step: int) -> int:
    return zlib.crc32(f"{request_id}:{step}".encode()) % VOCAB


class FakeEngine:
    """Just the batching part of the Engine protocol, plus a log."""

    name = "fake"
    device = "cpu"

    def __init__(self, *, fail_step: int | None = None, step_s: float = 0.002) -> None:
        self.caches: dict[str, int] = {}  # request id -> tokens held
        self.batch: dict[str, list] = {}  # request id -> [params, next step, produced]
        self.steps: list[tuple[str, ...]] = []  # each step's batch
        self.log: list[str] = []  # "step" and "chunk:<name>" in the order they ran
        self.fail_step = fail_step
        self.step_s = step_s  # a step takes a little time, as a real one does: streams read tokens as they come

    def add(self, request_id: str, first_token: int, params: SamplingParams, first_step: int = 0) -> None:
        if request_id not in self.caches:
            raise KeyError(request_id)
        if request_id in self.batch:
            raise ValueError(request_id)
        self.batch[request_id] = [params, first_step + 1, 0]

    def step(self) -> dict[str, int]:
        if self.fail_step is not None and len(self.steps) == self.fail_step:
            self.fail_step = None  # once
            raise RuntimeError("injected step failure")
        time.sleep(self.step_s)
        self.steps.append(tuple(self.batch))
        self.log.append("step")
        out = {}
        for rid, entry in list(self.batch.items()):
            params, step, produced = entry
            token = token_at(rid, step)
            entry[1], entry[2] = step + 1, produced + 1
            self.caches[rid] += 1
            out[rid] = token
            if is_last(token, produced + 1, params):
                del self.batch[rid]
        return out

    def remove(self, request_id: str) -> None:
        self.batch.pop(request_id, None)

    def running(self) -> list[str]:
        return list(self.batch)

    def cached_tokens(self, request_id: str) -> int:
        return self.caches[request_id]

    def release(self, request_id: str) -> None:
        self.remove(request_id)
        self.caches.pop(request_id, None)

    def close(self) -> None:
        pass

    def prefill_job(self, request_id: str, chunks: int) -> Generator[None, None, str]:
        """A prefill of ``chunks`` chunks, as a step-loop job."""
        self.caches[request_id] = 0
        for i in range(chunks):
            time.sleep(self.step_s)
            self.log.append(f"chunk:{request_id}")
            self.caches[request_id] += 1
            if i < chunks - 1:
                yield
        return f"prefilled {request_id}"


def expected(request_id: str, params: SamplingParams, first_step: int = 0) -> list[int]:
    tokens: list[int] = []
    step = first_step + 1
    while True:
        token = token_at(request_id, step)
        tokens.append(token)
        if is_last(token, len(tokens), params):
            return tokens
        step += 1


async def started_loop(engine: FakeEngine, **kwargs) -> tuple[EngineThread, StepLoop]:
    thread = EngineThread(lambda: engine, name="fake-engine")
    await thread.start()
    return thread, StepLoop(thread, **kwargs)


async def collect(stream) -> list[int]:
    return [token async for token in stream]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def test_requests_decode_together_and_each_gets_its_own_tokens() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine)
        params = {f"r{i}": SamplingParams(max_tokens=4 + 3 * i) for i in range(4)}
        for rid in params:
            engine.caches[rid] = 10
        streams = {rid: loop.join(rid, 1, p) for rid, p in params.items()}
        results = dict(zip(streams, await asyncio.gather(*map(collect, streams.values()))))
        for rid, p in params.items():
            assert results[rid] == expected(rid, p)
        assert engine.steps[0] == tuple(params)  # all four joined the first step together
        assert len(engine.steps) == max(p.max_tokens for p in params.values()) - 1
        assert engine.batch == {} and loop.num_running == 0
        thread.shutdown()

    run(main())


def test_a_request_joins_while_others_run_and_another_joins_as_one_finishes() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine)
        for rid in ("long", "short", "late", "later"):
            engine.caches[rid] = 5
        long = loop.join("long", 1, SamplingParams(max_tokens=30))
        short = loop.join("short", 1, SamplingParams(max_tokens=3))
        got_long: list[int] = []
        late = None
        async for token in long:
            got_long.append(token)
            if len(got_long) == 5:
                late = asyncio.ensure_future(collect(loop.join("late", 1, SamplingParams(max_tokens=6))))
        assert got_long == expected("long", SamplingParams(max_tokens=30))
        assert await collect(short) == expected("short", SamplingParams(max_tokens=3))
        assert await late == expected("late", SamplingParams(max_tokens=6))
        # "late" joined mid-stream: some step ran long and late together, and none ran late alone at first
        assert any(set(batch) == {"long", "late"} for batch in engine.steps)
        # short ended after its second step; the third step ran without it
        assert "short" in engine.steps[1] and "short" not in engine.steps[2]
        thread.shutdown()

    run(main())


def test_cancel_mid_batch_frees_the_slot_at_the_next_step_and_others_are_untouched() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine)
        for rid in ("keep", "drop"):
            engine.caches[rid] = 5
        params = SamplingParams(max_tokens=40)
        keep = loop.join("keep", 1, params)
        drop = loop.join("drop", 1, params)
        got: list[int] = []
        with pytest.raises(StreamCancelled):
            async for token in drop:
                got.append(token)
                if len(got) == 3:
                    drop.cancel()
        assert got == expected("drop", params)[:3]
        assert await collect(keep) == expected("keep", params)
        dropped_at = max(i for i, batch in enumerate(engine.steps) if "drop" in batch)
        assert dropped_at < 10  # left within a few steps, not at the end
        assert "drop" not in engine.batch and engine.caches["drop"] > 0  # the cache stays until release
        thread.shutdown()

    run(main())


def test_max_batch_bounds_the_running_requests_and_the_rest_wait_their_turn() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine, max_batch=2)
        rids = [f"q{i}" for i in range(5)]
        for rid in rids:
            engine.caches[rid] = 1
        params = SamplingParams(max_tokens=4)
        results = await asyncio.gather(*(collect(loop.join(rid, 1, params)) for rid in rids))
        assert results == [expected(rid, params) for rid in rids]
        assert max(len(batch) for batch in engine.steps) == 2
        thread.shutdown()

    run(main())


def test_prefill_chunks_interleave_with_decode_steps() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine)
        engine.caches["talker"] = 1
        stream = loop.join("talker", 1, SamplingParams(max_tokens=12))
        tokens = asyncio.ensure_future(collect(stream))
        await asyncio.sleep(0)  # let the stream start
        task = loop.prefill("long-prompt", engine.prefill_job("long-prompt", 6))
        assert await asyncio.wrap_future(task.future) == "prefilled long-prompt"
        await tokens
        chunks = [i for i, entry in enumerate(engine.log) if entry.startswith("chunk:")]
        # between the first and the last chunk, decode steps ran: the talker never waited for the whole prompt
        assert any(engine.log[i] == "step" for i in range(chunks[0], chunks[-1]))
        thread.shutdown()

    run(main())


def test_without_interleaving_a_prefill_runs_whole_between_steps() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine, interleave=False)
        engine.caches["talker"] = 1
        tokens = asyncio.ensure_future(collect(loop.join("talker", 1, SamplingParams(max_tokens=12))))
        await asyncio.sleep(0)
        task = loop.prefill("long-prompt", engine.prefill_job("long-prompt", 6))
        await asyncio.wrap_future(task.future)
        await tokens
        chunks = [i for i, entry in enumerate(engine.log) if entry.startswith("chunk:")]
        assert chunks == list(range(chunks[0], chunks[0] + 6))  # six chunks back to back
        thread.shutdown()

    run(main())


def test_prefills_run_first_come_first_served_and_a_queued_one_can_be_dropped() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine)
        first = loop.prefill("a", engine.prefill_job("a", 3))
        dropped = loop.prefill("b", engine.prefill_job("b", 3))
        third = loop.prefill("c", engine.prefill_job("c", 2))
        dropped.cancel()
        assert await asyncio.wrap_future(first.future) == "prefilled a"
        assert await asyncio.wrap_future(third.future) == "prefilled c"
        with pytest.raises(StreamCancelled):
            await asyncio.wrap_future(dropped.future)
        order = [entry for entry in engine.log if entry.startswith("chunk:")]
        assert order == ["chunk:a"] * 3 + ["chunk:c"] * 2  # b never ran
        thread.shutdown()

    run(main())


def test_a_failing_step_fails_the_running_streams_and_the_loop_goes_on() -> None:
    async def main() -> None:
        engine = FakeEngine(fail_step=2)
        thread, loop = await started_loop(engine)
        engine.caches["x"] = 1
        with pytest.raises(RuntimeError, match="injected"):
            await collect(loop.join("x", 1, SamplingParams(max_tokens=10)))
        engine.caches["y"] = 1
        params = SamplingParams(max_tokens=5)
        assert await collect(loop.join("y", 1, params)) == expected("y", params)
        thread.shutdown()

    run(main())


def test_a_join_without_a_cache_fails_that_request_only() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine)
        engine.caches["ok"] = 1
        params = SamplingParams(max_tokens=5)
        ok = loop.join("ok", 1, params)
        with pytest.raises(KeyError):
            await collect(loop.join("missing", 1, params))
        assert await collect(ok) == expected("ok", params)
        thread.shutdown()

    run(main())


def test_close_ends_every_stream_and_waiting_prefill() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine, max_batch=1)
        engine.caches["a"] = engine.caches["b"] = 1
        running = loop.join("a", 1, SamplingParams(max_tokens=10_000))
        waiting = loop.join("b", 1, SamplingParams(max_tokens=5))
        await running.__aiter__().__anext__()
        loop.close()
        with pytest.raises(LoopClosed):
            await collect(running)
        with pytest.raises(LoopClosed):
            await collect(waiting)
        with pytest.raises(LoopClosed):
            loop.join("c", 1, SamplingParams(max_tokens=5))
        thread.shutdown()

    run(main())


def test_a_join_that_would_pad_the_batch_past_its_token_bound_waits_for_rows_to_leave() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine, max_batch_tokens=100)
        engine.caches["short"] = 10
        engine.caches["long"] = 60  # 2 rows x 61+ slots > 100: it may not join while "short" runs
        short = loop.join("short", 1, SamplingParams(max_tokens=6))
        long = loop.join("long", 1, SamplingParams(max_tokens=4))
        assert await collect(short) == expected("short", SamplingParams(max_tokens=6))
        assert await collect(long) == expected("long", SamplingParams(max_tokens=4))
        assert not any({"short", "long"} <= set(batch) for batch in engine.steps)
        thread.shutdown()

    run(main())


def test_a_cancelled_prefill_behind_others_ends_at_the_next_step_not_at_its_turn() -> None:
    async def main() -> None:
        engine = FakeEngine()
        thread, loop = await started_loop(engine)
        long = loop.prefill("long", engine.prefill_job("long", 40))
        waiting = loop.prefill("waiting", engine.prefill_job("waiting", 2))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(StreamCancelled):
            await asyncio.wrap_future(waiting.future)
        assert not long.future.done()  # dropped while the long one still ran
        await asyncio.wrap_future(long.future)
        assert "chunk:waiting" not in engine.log
        thread.shutdown()

    run(main())
