"""A user placement policy: DESIGN's streaming rule, written from scratch.

Decode on the decode-capable node with the most memory bandwidth. Prefill on
the prefill-capable node with the most TFLOPS only when the link to the decode
node can carry the KV as fast as that node produces it (then layer-wise
streaming hides the transfer), and that node's queued prefill work is shorter
than the decode node prefilling the prompt itself; otherwise prefill locally.

Use it live or in the simulator:

    pdc serve --policy examples/policies/streaming_rule.py:StreamingRule
    pdc simulate --cluster examples/clusters/spark-m4max-10gbe.toml --model llama-3.1-8b \\
        --prompt-tokens 8192 --policy examples/policies/streaming_rule.py:StreamingRule,conditional

Run this file to compare it with the built-in ``conditional`` policy over four links.
"""
from __future__ import annotations

from scheduler import costmodel
from scheduler.placement import ClusterView, NodeView, Placement
from scheduler.request import GenerationRequest, NoCapacityError

ASSUMED_COMPUTE_EFFICIENCY = 0.5  # achieved / peak TFLOPS in prefill: deliberately rough


class StreamingRule:
    """Remote prefill only when the link hides the KV transfer."""

    def place(self, request: GenerationRequest, cluster: ClusterView) -> Placement:
        decoders = [n for n in cluster.nodes if n.can_decode]
        if not decoders:
            raise NoCapacityError(f"no decode-capable node serves {request.model!r}")
        decode = max(decoders, key=lambda n: (n.mem_bw_gbps, -n.active_requests, n.node_id))
        others = [n for n in cluster.nodes if n.can_prefill and n.node_id != decode.node_id]
        if not others or cluster.model_config is None:
            return Placement(None, decode.node_id)
        prefill = max(others, key=lambda n: (n.tflops, -n.active_requests, n.node_id))
        link = cluster.link(prefill.node_id, decode.node_id)
        model = costmodel.model_cost(cluster.model_config)
        num_tokens = len(request.prompt_token_ids)
        if link is None or not self._link_hides_kv(model, prefill, link.gbps, num_tokens):
            return Placement(None, decode.node_id)
        local_s = self._prefill_s(model, decode, num_tokens - request.cached_prefix_tokens)
        if prefill.prefill_backlog_s > local_s:
            return Placement(None, decode.node_id)
        return Placement(prefill.node_id, decode.node_id)

    @staticmethod
    def _prefill_s(model: costmodel.ModelCost, node: NodeView, num_tokens: int) -> float:
        """Rough prefill seconds: 2 FLOPs per active parameter per token."""
        return 2 * model.layer_active_params * num_tokens / (node.tflops * 1e12 * ASSUMED_COMPUTE_EFFICIENCY)

    def _link_hides_kv(self, model: costmodel.ModelCost, prefill: NodeView, gbps: float, num_tokens: int) -> bool:
        """DESIGN: link bytes/s >= KV bytes per token x prefill tokens/s."""
        kv_rate = costmodel.kv_bytes(model, num_tokens) / self._prefill_s(model, prefill, num_tokens)
        return gbps * 1e9 / 8 >= kv_rate


if __name__ == "__main__":
    from pathlib import Path

    from scheduler.sim import cluster_file
    from scheduler.sim.cli import SimConfig, simulate

    here = Path(__file__).resolve()
    base = (here.parents[1] / "clusters" / "spark-m4max-10gbe.toml").read_text()
    mine = f"{here}:StreamingRule"
    for kind in ("10gbe", "2.5gbe", "1gbe", "wifi6"):
        spec = cluster_file.loads(base.replace('kind = "10gbe"', f'kind = "{kind}"'), source=kind)
        runs = simulate(SimConfig(spec, "llama-3.1-8b", (mine, "conditional"), prompt_tokens=8192, output_tokens=128))
        for name, run in runs.items():
            r = run.requests[0]
            where = f"{r.decode_node} (colocated)" if r.colocated else f"{r.prefill_node} -> {r.decode_node}"
            print(f"{kind:6} {name.rpartition(':')[2]:13} {where:18} {r.kv_codec or '-':4} "
                  f"ttft {r.ttft_s:6.2f} s  e2e {r.e2e_s:6.2f} s")
