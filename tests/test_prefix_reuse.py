"""Prefix reuse across turns and requests, through real workers.

In-process workers (a torch prefill node and an MLX decode node, both with a
prefix cache) are driven RPC by RPC as the scheduler drives them, so each
test can see what was reused where and what crossed the wire; the last test
goes through a real scheduler and the official openai client. Every output is
compared with the decode engine generating alone on the whole prompt: a
reused prefix changes what is computed and sent, never the tokens.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from conftest import (
    SchedulerProcess,
    config,
    requires_torch_and_mlx,
    run,
    start_worker_process,
    started,
    stop_processes,
)

from cluster.auth import generate_key, write_config
from cluster.blocks import BLOCK_TOKENS, block_hashes
from cluster.status import node_loads
from proto import pdcluster_pb2 as pb
from workers.engines.base import generate
from workers.engines.registry import load_engine
from workers.engines.sampling import SamplingParams, sample
from workers.rpc.server import Worker

pytestmark = requires_torch_and_mlx
STREAM_TIMEOUT_S = 60.0
CACHE_BYTES = 200_000_000


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens)


def alone(model: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """The MLX engine generating greedily on the whole prompt, no cache anywhere."""
    engine = load_engine("mlx", model, "float32")
    params = SamplingParams(max_tokens=max_tokens)
    first = sample(engine.prefill("ref", prompt, lambda s: None).logits, params, 0)
    return [first, *generate(engine, "ref", first, params)]


async def disaggregated(p, d, rid: str, prompt: list[int], max_tokens: int
                        ) -> tuple[list[int], pb.Reserved, pb.PrefillReply, pb.Done]:
    """One request the way the scheduler runs it: Decode first, then Prefill with skip_tokens."""
    call = d.decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=greedy(max_tokens)),
                    timeout=STREAM_TIMEOUT_S)
    first = await asyncio.wait_for(call.read(), 30)
    reserved = first.reserved
    prefill = asyncio.ensure_future(p.prefill(pb.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=greedy(max_tokens), kv_host=reserved.kv_host,
        kv_port=reserved.kv_port, transfer_token=reserved.transfer_token, skip_tokens=reserved.cached_tokens),
        timeout=30))
    tokens, done = [], None
    async for event in call:
        if event.HasField("token"):
            tokens.append(event.token.token_id)
        elif event.HasField("done"):
            done = event.done
    return tokens, reserved, await prefill, done


async def colocated(d, rid: str, prompt: list[int], max_tokens: int) -> tuple[list[int], pb.Done]:
    request = pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=greedy(max_tokens),
                               local_prefill=True)
    tokens, done = [], None
    async for event in d.decode(request, timeout=STREAM_TIMEOUT_S):
        if event.HasField("token"):
            tokens.append(event.token.token_id)
        elif event.HasField("done"):
            done = event.done
    return tokens, done


def test_the_next_turn_ships_only_what_the_decode_node_lacks_mixed_case(model: Path) -> None:
    """Turn 1 leaves the prompt on the prefill node and prompt + answer on the
    decode node. Turn 2 (turn 1 + answer + a new message): the prefill node
    computes from its own cached block on, the decode node is sent only what
    it lacks, and the tokens are those of a cold run."""
    key = generate_key()
    prefiller = Worker(config(model, key, "prefill", engine="torch", prefix_cache_bytes=CACHE_BYTES))
    decoder = Worker(config(model, key, "decode", prefix_cache_bytes=CACHE_BYTES))
    turn1 = [(11 * i + 5) % 900 + 20 for i in range(120)]  # 1 full block on the prefill node
    answer_len = 40  # prompt + fed answer = 159 tokens: 2 full blocks on the decode node

    async def body() -> None:
        async with started(prefiller, decoder) as (p, d):
            answer, reserved1, reply1, done1 = await disaggregated(p, d, "t1", turn1, answer_len)
            assert reserved1.cached_tokens == 0 and reply1.cached_tokens == 0
            fingerprint = decoder.model_info.fingerprint
            assert list(reply1.prefix_blocks) == block_hashes(fingerprint, turn1)  # the prompt's one block
            assert list(done1.prefix_blocks) == block_hashes(fingerprint, turn1 + answer)[:2]

            turn2 = turn1 + answer + [(7 * i + 3) % 900 + 20 for i in range(70)]
            tokens, reserved, reply, done = await disaggregated(p, d, "t2", turn2, 12)
            assert reserved.cached_tokens == 2 * BLOCK_TOKENS  # the decode node holds prompt + answer
            assert reply.cached_tokens == BLOCK_TOKENS  # the prefill node held only turn 1's first block
            bytes_per_token = decoder.engines.engine.kv_layout(1).total_bytes
            shipped = len(turn2) - 2 * BLOCK_TOKENS
            # only what the decode node lacked (plus the frames' headers)
            assert shipped * bytes_per_token <= done.timings.kv_bytes < 1.05 * shipped * bytes_per_token
            assert (done.timings.cached_tokens, done.timings.decode_cached_tokens) == (BLOCK_TOKENS, 2 * BLOCK_TOKENS)
            assert tokens == alone(model, turn2, 12)
            assert (await d.stats()).prefix_hits == 1 and (await p.stats()).prefix_hits == 1

    run(body, timeout=180)


def test_a_shared_system_prompt_is_prefilled_once_on_a_colocated_node(model: Path) -> None:
    key = generate_key()
    decoder = Worker(config(model, key, "both", prefix_cache_bytes=CACHE_BYTES))
    system = [(13 * i + 1) % 900 + 20 for i in range(200)]  # 3 full blocks

    async def body() -> None:
        async with started(decoder) as (d,):
            first, done1 = await colocated(d, "a", system + [101, 102, 103], 8)
            assert done1.timings.cached_tokens == 0
            second_prompt = system + [201, 202, 203, 204]
            second, done2 = await colocated(d, "b", second_prompt, 8)
            assert done2.timings.cached_tokens == 3 * BLOCK_TOKENS
            assert second == alone(model, second_prompt, 8)
            # an earlier token changed: the chained hashes miss every block
            changed = [system[0] + 1, *system[1:], 201, 202, 203, 204]
            third, done3 = await colocated(d, "c", changed, 8)
            assert done3.timings.cached_tokens == 0 and third == alone(model, changed, 8)
            loads = await node_loads([_node(decoder)], key)
            load = loads[decoder.config.node_id]
            assert load["prefix_hits"] == 1 and load["prefix_hit_tokens"] == 3 * BLOCK_TOKENS
            assert 0 < load["prefix_cache_bytes"] <= load["prefix_cache_capacity_bytes"] == CACHE_BYTES

    run(body, timeout=180)


def test_with_a_kv_budget_the_prefix_cache_yields_to_live_requests(model: Path) -> None:
    key = generate_key()
    decoder = Worker(config(model, key, "both", prefix_cache_bytes=CACHE_BYTES, max_reserved_bytes=400 * 2048))

    async def body() -> None:
        async with started(decoder) as (d,):
            per_token = decoder.engines.engine.kv_layout(1).total_bytes
            budget = decoder.leases.max_reserved_bytes
            prompt = [(3 * i + 7) % 900 + 20 for i in range(300)]
            await colocated(d, "fill", prompt, 4)
            held = (await d.stats()).prefix_cache_bytes
            assert held > 0
            # a request whose reservation needs what the cache holds: the cache shrinks, the request runs
            big = [(5 * i + 2) % 900 + 20 for i in range(budget // per_token - 8)]
            tokens, done = await colocated(d, "big", big, 4)
            assert len(tokens) == 4
            stats = await d.stats()
            assert stats.prefix_cache_bytes + stats.reserved_kv_bytes <= budget

    run(body, timeout=180)


def _node(worker: Worker):
    from cluster.node import NodeInfo

    return NodeInfo(**worker.node_info(), source="static")


def test_a_conversation_through_the_scheduler_reports_cached_tokens(model: Path, tmp_path: Path) -> None:
    """The openai client sees usage.prompt_tokens_details.cached_tokens and the
    pdcluster object's cached figures on the second turn."""
    key_file = write_config(tmp_path / "cluster.json", generate_key())
    workers = [start_worker_process(role, engine, model, key_file, tmp_path / f"{role}.log", "--prefix-cache-gb", "0.2")
               for role, engine in (("prefill", "torch"), ("decode", "mlx"))]
    scheduler = None
    try:
        for worker in workers:
            assert worker.ready.wait(120), worker.tail()
        scheduler = SchedulerProcess(key_file, [w.grpc for w in workers], tmp_path / "scheduler.log")
        scheduler.wait_ready(2)
        client = openai.OpenAI(base_url=scheduler.url + "/v1", api_key="x", timeout=120, max_retries=0)
        model_id = client.models.list().data[0].id
        messages = [{"role": "system", "content": " ".join(["You are a careful assistant."] * 40)},
                    {"role": "user", "content": "Say something about caches."}]
        first = client.chat.completions.create(model=model_id, messages=messages, max_tokens=16, temperature=0)
        assert first.usage.prompt_tokens_details is None or not first.usage.prompt_tokens_details.cached_tokens
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And about prefixes?"}]
        second = client.chat.completions.create(model=model_id, messages=messages, max_tokens=16, temperature=0)
        stats = second.model_extra["pdcluster"]
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached > 0 and cached % BLOCK_TOKENS == 0 and cached == stats["cached_prefix_tokens"] == stats["cached_tokens"]
        assert stats["decode_cached_tokens"] > 0
        # the same request on a cold cluster view: forced colocated vs what was served must agree token for token
        again = client.chat.completions.create(model=model_id, messages=messages, max_tokens=16, temperature=0,
                                               extra_body={"pdcluster": {"placement": "colocated"}})
        assert again.choices[0].message.content == second.choices[0].message.content
    finally:
        stop_processes(workers + ([scheduler] if scheduler else []))


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
