"""A running scheduler's ``/metrics``, summed up: what Prometheus would graph, in one print.

Scrapes ``GET /metrics`` once, parses it with prometheus_client's own parser
and prints requests by outcome, p50/p90 time to first token and inter-token
latency (interpolated in the buckets, as PromQL's ``histogram_quantile``
does), tokens per node, KV bytes per link next to the link's measured
bandwidth, and each node's last reported load. docs/operations.md, "Metrics",
lists every series.

    .venv/bin/pdc up &                                          # or any running pdc serve
    .venv/bin/python examples/metrics_summary.py --url http://127.0.0.1:8000 [--api-key KEY]
    .venv/bin/python examples/metrics_summary.py --demo         # a tiny local cluster, 8 requests, then the summary
"""
from __future__ import annotations

import argparse
import math
import os
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str, api_key: str | None) -> Samples:
    """Every sample of ``url``/metrics as (name, labels, value)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/metrics", headers=headers),
                                timeout=10) as reply:
        text = reply.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``name``'s values summed per value of ``label``."""
    out: dict[str, float] = defaultdict(float)
    for n, labels, value in samples:
        if n == name:
            out[labels.get(label, "")] += value
    return dict(out)


def quantile(samples: Samples, histogram: str, q: float) -> float | None:
    """The ``q`` quantile of ``histogram`` over all its label sets (None without observations),
    interpolated linearly inside the bucket it falls in, as PromQL's histogram_quantile."""
    buckets: dict[float, float] = defaultdict(float)
    for n, labels, value in samples:
        if n == histogram + "_bucket":
            buckets[float(labels["le"])] += value
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is the best answer
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return None


def summary(samples: Samples) -> str:
    """The printed summary of one scrape."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:.1f} ms"

    lines = [f"requests: {by_label(samples, 'pdcluster:request_success_total', 'finished_reason') or 'none yet'}"]
    failures = by_label(samples, "pdcluster:request_failure_total", "code")
    if failures:
        lines.append(f"failures: {failures}")
    for title, name in (("TTFT", "pdcluster:time_to_first_token_seconds"),
                        ("ITL", "pdcluster:inter_token_latency_seconds")):
        lines.append(f"{title}: p50 {ms(quantile(samples, name, 0.5))}, p90 {ms(quantile(samples, name, 0.9))}")
    lines.append(f"placements: {by_label(samples, 'pdcluster:placements_total', 'mode')}")
    for node, tokens in sorted(by_label(samples, "pdcluster:generation_tokens_total", "node").items()):
        lines.append(f"node {node}: {tokens:.0f} tokens decoded")
    bandwidth = {(labels["src"], labels["dst"]): v for n, labels, v in samples
                 if n == "pdcluster:link_bandwidth_bytes_per_second"}
    sent: dict[tuple[str, str], float] = defaultdict(float)
    for n, labels, value in samples:
        if n == "pdcluster:kv_bytes_transferred_total":
            sent[labels["src"], labels["dst"]] += value
    for link in sorted(set(sent) | set(bandwidth)):
        measured = f"{bandwidth[link] * 8 / 1e9:.2f} Gbit/s measured" if link in bandwidth else "not measured"
        lines.append(f"link {link[0]} -> {link[1]}: {sent.get(link, 0):.0f} KV bytes sent, {measured}")
    running = by_label(samples, "pdcluster:node_num_requests_running", "node")
    reserved = by_label(samples, "pdcluster:node_kv_reserved_bytes", "node")
    for node in sorted(running):
        lines.append(f"node {node} (last Stats): {running[node]:.0f} decoding, {reserved.get(node, 0):.0f} KV bytes "
                     "reserved")
    return "\n".join(lines)


def demo() -> str:
    """A tiny local cluster (the processes of ``pdc up``), 8 requests through the openai client; its URL."""
    import atexit
    import tempfile
    from pathlib import Path

    import openai

    from cluster.launcher import LocalCluster, UpConfig
    from workers.tools.modelgen import make_model

    model = make_model(Path(tempfile.mkdtemp()) / "tiny-llama", "llama", seed=0, preset="tiny")
    cluster = LocalCluster(UpConfig(model=str(model), port=_free_port(),
                                    extra_worker_args=("--tflops", "1", "--mem-bw-gbps", "100")))
    cluster.start()
    atexit.register(cluster.stop)
    cluster.wait_ready()
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)
    name = client.models.list().data[0].id
    for i in range(8):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"Count to {i}."}],
                                       max_tokens=16, extra_body={"pdcluster": {"placement": ("disaggregated",
                                                                                           "colocated")[i % 2]}})
    return cluster.url


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the scheduler (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("PDC_API_KEY"),
                        help="its API key, if it has one (default: $PDC_API_KEY)")
    parser.add_argument("--demo", action="store_true", help="start a tiny local cluster and send 8 requests first")
    args = parser.parse_args()
    url = demo() if args.demo else args.url
    print(summary(scrape(url, args.api_key)))


if __name__ == "__main__":
    main()
