"""``pdc demo``: a local cluster, one streamed chat request, a short summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

from cluster.launcher import LocalCluster, UpConfig

QUESTION = "What is the capital of France?"
EXPECTED = "Paris"  # the known answer a real model must give


def run_demo(config: UpConfig, max_tokens: int = 32) -> int:
    """Start the cluster, send the request, print the summary; 0 if all went as designed."""
    import openai

    print(f"pdc demo: starting scheduler, prefill worker ({config.prefill_engine}) and decode worker "
          f"({config.decode_engine}) on {config.model}")
    started = time.monotonic()
    with LocalCluster(config) as cluster:
        health = cluster.wait_ready()
        print(f"  cluster ready in {time.monotonic() - started:.1f} s: "
              + ", ".join(f"{n['node_id']} ({'/'.join(n['roles'])}, {n['engine']})" for n in health["nodes"]))
        client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="pdcluster", timeout=300, max_retries=0)
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": QUESTION}]
        text, stats, ttft, elapsed = _streamed(client, model, messages, max_tokens)
        single = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0,
            extra_body={"pdcluster": {"placement": "colocated"}},
        )
        health = cluster.wait_ready()  # now with the link the scheduler probed
    single_text = single.choices[0].message.content or ""
    real = _is_real_model(config.model)
    print(f"  question: {QUESTION}")
    print(f"  answer:   {text.strip()!r}")
    if real:
        correct = EXPECTED.lower() in text.lower()
        print(f"  expected: {EXPECTED!r} -> {'correct' if correct else 'NOT FOUND in the answer'}")
    else:
        correct = True
        print("  (this model has random weights: the text is noise; what matters is where it ran and that it matches)")
    _print_summary(text, stats, ttft, elapsed, single_text == text, single.model_extra["pdcluster"]["decode_node"])
    for link in health.get("links", []):
        measured = (f"{link['gbps']:.1f} Gbit/s, {link['latency_ms']:.2f} ms one way" if not link["error"]
                    else f"probe failed: {link['error']}")
        print(f"  {'link (probed)':<16} {link['prefill_node']} -> {link['decode_node']}: {measured}")
    print(f"  {'policy':<16} {health.get('policy', '?')} (this request forced \"disaggregated\" to show the split)")
    disaggregated = stats["prefill_node"] != stats["decode_node"]
    return 0 if disaggregated and single_text == text and correct else 1


def _is_real_model(model: str) -> bool:
    """Whether ``model`` has trained weights: anything but pdcluster's random
    checkpoints, which ``pdc make-model`` marks in ``pdcluster-model.json``."""
    marker = Path(model) / "pdcluster-model.json"
    if not marker.is_file():
        return True
    return json.loads(marker.read_text()).get("kind") != "random"


def _streamed(client, model: str, messages: list[dict], max_tokens: int) -> tuple[str, dict, float, float]:
    sent = time.monotonic()
    ttft, parts, stats = None, [], {}
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"pdcluster": {"placement": "disaggregated"}},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.monotonic() - sent
            parts.append(chunk.choices[0].delta.content)
        stats = (chunk.model_extra or {}).get("pdcluster", stats)
    return "".join(parts), stats, ttft or 0.0, time.monotonic() - sent


def _print_summary(text: str, s: dict, ttft: float, elapsed: float, identical: bool, single_node: str) -> None:
    tokens = s.get("completion_tokens", 0)
    decode_s = max(elapsed - ttft, 1e-9)
    rows = [
        ("prefill node", s.get("prefill_node", "?")),
        ("decode node", s.get("decode_node", "?")),
        ("KV bytes", f"{s.get('kv_bytes', 0):,}"),
        ("KV transfer", f"{s.get('transfer_s', 0) * 1000:.1f} ms (exposed after prefill: "
                        f"{s.get('exposed_transfer_s', 0) * 1000:.1f} ms)"),
        ("prefill compute", f"{s.get('prefill_s', 0) * 1000:.1f} ms"),
        ("TTFT (client)", f"{ttft * 1000:.1f} ms"),
        ("decode speed", f"{max(tokens - 1, 0) / decode_s:.1f} tokens/s ({tokens} tokens)"),
        ("single-node run", f"{'IDENTICAL' if identical else 'DIFFERENT'} text (colocated on {single_node})"),
    ]
    for name, value in rows:
        print(f"  {name:<16} {value}")
