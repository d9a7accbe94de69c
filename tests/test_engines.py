"""Engine behaviour: layer-wise emission, decode knobs, bf16 at the edges, what the cache holds."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_mlx, requires_torch

from workers.engines.base import KVSlice, generate
from workers.engines.sampling import SamplingParams, sample
from workers.engines.registry import load_engine
from workers.engines.thread import EngineThread

ROOT = Path(__file__).resolve().parent.parent
ENGINES = [pytest.param("torch", marks=requires_torch), pytest.param("mlx", marks=requires_mlx)]
PROMPT = list(range(5, 205))  # 200 tokens: two chunks of 128 and 72


@pytest.mark.parametrize("kind", ENGINES)
def test_slices_are_emitted_while_later_layers_have_not_run(kind: str, make_tiny_model) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    seen: list[tuple[int, int, int]] = []  # (layer, start, last layer's cached tokens at emission)

    def on_slice(s: KVSlice) -> None:
        seen.append((s.layer, s.start, engine.cached_tokens("r")))

    engine.prefill("r", PROMPT, on_slice, chunk_size=128)
    num_layers = engine.spec.num_layers
    assert [(layer, start) for layer, start, _ in seen] == [
        (layer, start) for start in (0, 128) for layer in range(num_layers)
    ]
    # When layer 0 of a chunk is emitted, the last layer has not yet seen that chunk.
    for layer, start, last_layer_tokens in seen:
        if layer < num_layers - 1:
            assert last_layer_tokens == start


@pytest.mark.parametrize("kind", ENGINES)
def test_decode_stops_at_stop_token_and_at_max_tokens(kind: str, make_tiny_model) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    greedy = SamplingParams(max_tokens=12)
    result = engine.prefill("a", PROMPT, lambda s: None)
    first = sample(result.logits, greedy, 0)
    tokens = [first, *generate(engine, "a", first, greedy)]
    assert len(tokens) == 12
    stop_at = tokens[5]
    engine.release("a")
    result = engine.prefill("b", PROMPT, lambda s: None)
    stopped = [first, *generate(engine, "b", first, SamplingParams(max_tokens=12, stop_token_ids=(stop_at,)))]
    assert stopped == tokens[: tokens.index(stop_at) + 1]


@requires_torch
@requires_mlx
def test_seeded_sampling_is_identical_across_engines(make_tiny_model) -> None:
    folder = make_tiny_model("qwen3")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    outputs = []
    for kind in ("torch", "mlx"):
        engine = load_engine(kind, folder, "float32")
        result = engine.prefill("s", PROMPT, lambda s: None)
        first = sample(result.logits, params, 0)
        outputs.append([first, *generate(engine, "s", first, params)])
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[0][:1] * len(outputs[0])  # sampling actually varied


@requires_torch
@requires_mlx
@pytest.mark.parametrize("direction", [("torch", "mlx"), ("mlx", "torch")])
def test_bf16_kv_lands_bit_exact_in_the_other_engines_cache(direction: tuple[str, str], make_tiny_model) -> None:
    folder = make_tiny_model("llama")
    source, target = (load_engine(kind, folder, "bfloat16") for kind in direction)
    slices: list[KVSlice] = []
    source.prefill("x", PROMPT, slices.append)
    assert {s.dtype for s in slices} == {"bfloat16"} and slices[0].keys.dtype == np.uint16
    target.load_kv("x", source.kv_layout(len(PROMPT)), slices)
    for layer in range(target.spec.num_layers):
        cached = target.cached_layer("x", layer)  # the cache's own bf16 bits, [kv_heads, tokens, head_dim] uint16
        assert (cached.layer, cached.start, cached.dtype, cached.keys.dtype) == (layer, 0, "bfloat16", np.uint16)
        for got, part in ((cached.keys, "keys"), (cached.values, "values")):
            wire = np.concatenate([getattr(s, part) for s in slices if s.layer == layer], axis=1)
            np.testing.assert_array_equal(got, wire)


@pytest.mark.parametrize("kind", ENGINES)
def test_load_kv_rejects_a_different_models_layout(kind: str, make_tiny_model) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    layout = engine.kv_layout(4)
    wrong = type(layout)(layout.num_layers, layout.kv_heads + 1, layout.head_dim, layout.dtype, 4)
    with pytest.raises(ValueError, match="kv_heads"):
        engine.load_kv("w", wrong, [])


@pytest.mark.parametrize("kind", ENGINES)
def test_the_engine_says_which_caches_it_holds_and_how_many_tokens(kind: str, make_tiny_model) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    assert engine.cached_requests() == []
    slices: list[KVSlice] = []
    engine.prefill("p", PROMPT, slices.append)
    engine.load_kv("l", engine.kv_layout(len(PROMPT)), slices)
    assert engine.cached_requests() == ["p", "l"]
    assert engine.cached_tokens("p") == engine.cached_tokens("l") == len(PROMPT)
    greedy = SamplingParams(max_tokens=4)
    fed = list(generate(engine, "l", 7, greedy))  # feeds 7 and the tokens before the last
    assert engine.cached_tokens("l") == len(PROMPT) + len(fed)
    for layer in (0, engine.spec.num_layers - 1):  # the loaded cache keeps exactly the slices it was given
        loaded = engine.cached_layer("p", layer)
        np.testing.assert_array_equal(loaded.keys, np.concatenate([s.keys for s in slices if s.layer == layer], axis=1))
    engine.release("p")
    assert engine.cached_requests() == ["l"]
    with pytest.raises(KeyError, match="no KV cache for request 'p'"):
        engine.cached_tokens("p")
    engine.release("l")
    engine.release("l")  # releasing twice is a no-op
    assert engine.cached_requests() == []


@pytest.mark.parametrize("kind", ENGINES)
def test_free_memory_and_the_start_up_measurement_come_from_the_engine(kind: str, make_tiny_model) -> None:
    engine = load_engine(kind, make_tiny_model("llama"), "float32")
    assert engine.free_memory_bytes() > 0  # the host figure on a CPU or MLX device
    measured = engine.measure_profile(0.05)
    assert measured.tflops > 0 and measured.mem_bw_gbps > 0


# ---------------------------------------------------------------- closing

# An MLX engine used on a thread that is still alive when the interpreter
# finalizes: the thread's exit destructors then run during finalization. MLX
# 0.32's per-thread random key takes the GIL in its destructor, which aborts
# the process ("terminate called without an active exception", exit -6), as a
# `pdc worker` did now and then on SIGTERM. ``close`` frees that state first.
USE_CLOSE_AND_OUTLIVE_THE_INTERPRETER = """
import sys, threading, time
from workers.engines.registry import load_engine
closed = threading.Event()

def engine_thread():
    engine = load_engine("mlx", sys.argv[1], "float32")
    engine.prefill("r", list(range(10, 50)), lambda s: None)
    engine.close()
    closed.set()
    while True:  # alive while the main thread exits and the interpreter finalizes
        time.sleep(0.001)

threading.Thread(target=engine_thread, daemon=True).start()
assert closed.wait(120)
"""


@requires_mlx
def test_a_closed_mlx_engine_lets_the_process_exit_cleanly_even_if_its_thread_outlives_python(
        make_tiny_model) -> None:
    done = subprocess.run([sys.executable, "-c", USE_CLOSE_AND_OUTLIVE_THE_INTERPRETER, str(make_tiny_model("llama"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("kind", ENGINES)
def test_close_frees_every_cache(kind: str, make_tiny_model) -> None:
    def on_its_thread() -> None:  # MLX cannot compute on a thread after close: keep it off the test's
        engine = load_engine(kind, make_tiny_model("llama"), "float32")
        engine.prefill("a", PROMPT, lambda s: None)
        engine.close()
        assert engine.cached_requests() == []

    worker = threading.Thread(target=on_its_thread)
    worker.start()
    worker.join()


class _Recorder:
    """An engine stand-in that records which thread closed it."""

    name = "recorder"

    def __init__(self, calls: list[tuple[str, int]]) -> None:
        self.calls = calls

    def close(self) -> None:
        self.calls.append(("close", threading.get_ident()))


def test_engine_thread_shutdown_drops_queued_jobs_then_closes_the_engine_on_its_thread() -> None:
    calls: list[tuple[str, int]] = []
    started, gate = threading.Event(), threading.Event()

    def running_job() -> None:
        started.set()
        gate.wait(10)
        calls.append(("running", threading.get_ident()))

    async def body() -> None:
        engines = EngineThread(lambda: _Recorder(calls))
        await engines.start()
        running = engines.submit(running_job)
        assert started.wait(10)
        queued = engines.submit(calls.append, ("queued", 0))
        closing = engines.shutdown()
        assert queued.cancelled() and not running.cancelled()
        gate.set()
        closing.result(10)
        assert [what for what, _ in calls] == ["running", "close"]  # the running job ends first
        assert calls[0][1] == calls[1][1]  # on the engine's own thread
        with pytest.raises(RuntimeError):
            engines.submit(print)  # no job after the close

    asyncio.run(asyncio.wait_for(body(), 20))
