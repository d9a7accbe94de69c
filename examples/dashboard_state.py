"""What the web dashboard at the scheduler's ``/`` shows, printed as text tables from ``GET /dashboard/state``.

The page polls the same JSON once a second (docs/operations.md, "Dashboard"):
the nodes with their health, load and KV memory; the links; and the last
requests with their phases (queue, prefill, KV transfer, decode) on the nodes
that ran them. Open ``http://HOST:PORT/`` in a browser for the live page, and
sign in with ``pdc dashboard --url URL`` to switch the policy there.

    pdc up &
    python examples/dashboard_state.py --url http://127.0.0.1:8000 [--api-key KEY] [-n 10]
"""
from __future__ import annotations

import argparse
import json
import urllib.request


def fetch(url: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/dashboard/state", headers=headers), timeout=10) as r:
        return json.loads(r.read())


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the scheduler (default: %(default)s)")
    parser.add_argument("--api-key", default=None, help="the scheduler's --api-key: details are for key holders")
    parser.add_argument("-n", type=int, default=10, help="recent requests to list (default: %(default)s)")
    args = parser.parse_args()
    state = fetch(args.url, args.api_key)
    print(f"status {state['status']}   policy {state['policy']}   KV codec {state['kv_codec']}")
    if not state.get("details"):
        print("(node, link and request details are for API-key holders: pass --api-key)")
        return
    print(f"\n{'node':<32} {'roles':<16} {'health':<9} {'running':>7} {'KV used/total GiB':>18}")
    for node in state["nodes"]:
        roles = ",".join(node.get("roles", []))
        print(f"{node['node_id']:<32} {roles:<16} {node['health']:<9} {node['running_requests']:>7} "
              f"{gib(node['kv_used_bytes']) + ' / ' + gib(node['kv_total_bytes']):>18}")
    print(f"\n{'link':<66} {'Gbit/s':>8} {'ms':>7}")
    for link in state["links"]:
        name = f"{link['prefill_node']} -> {link['decode_node']}"
        print(f"{name:<66} {link['gbps'] or 0:>8.2f} {link['latency_ms'] or 0:>7.3f}" + (
            f"  ({link['error']})" if link.get("error") else ""))
    print(f"\n{'request':<36} {'outcome':<8} {'TTFT ms':>8}  phases (start-end ms, node)")
    for record in state["requests"]["recent"][-args.n:]:
        phases = "  ".join(f"{p['phase']} {p['start_s'] * 1e3:.1f}-{p['end_s'] * 1e3:.1f}"
                           + (f" {p['node']}" if p["node"] and p["phase"] != "transfer" else "")
                           for p in record["phases"])
        print(f"{record['request_id']:<36} {record['outcome']:<8} {(record['ttft_s'] or 0) * 1e3:>8.1f}  {phases}")


if __name__ == "__main__":
    main()
