"""``pdc bench link``'s arithmetic and report: link classes, theory, rows, targets, table, plot.

Pure functions over plain data (no processes, no network), so the tests
check them without root:

* ``LINK_CLASSES`` and ``parse_links``: the home links the bench emulates;
* ``theory_exposed``: what layer-wise streaming leaves exposed,
  ``max(0, T_transfer - T_prefill)`` with ``T_transfer`` = bytes on the wire
  over the link's *measured* payload rate (the scheduler's ``ProbeLink``
  over the same veth) plus its measured one-way latency;
* ``build_row``: one row per link x codec x prompt length from the
  ``pdcluster`` objects of the requests that ran it, with each target's
  verdict (data, not assertions);
* ``sim_cluster_toml`` / ``sim_trace`` / ``read_sim``: the ``pdc simulate``
  inputs describing the same nodes (their start-up measurements) and link
  (its probe), and its answer read back;
* ``print_table`` and ``plot``.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

# The exposed transfer is within 10 % of theory, or within 20 ms (the floor where theory is ~0).
EXPOSED_REL_TOL, EXPOSED_ABS_TOL_S = 0.10, 0.020
SIM_REL_TOL = 0.20  # the simulator's TTFT is within 20 % of the measured one
MIN_GAIN = 0.20  # the conditional policy's margin (scheduler/policy.py Conditional.min_gain)
# pdc simulate prices a node with the generic efficiencies of its weight format (bf16: compute 0.75,
# bandwidth 0.75, attention and KV reads 0.5); the live Predictor prices a node that measured itself
# with costmodel.MEASURED (1.0, 1.0, 0.67, 0.67). Declaring measured / 0.75 in the cluster file makes
# the two the same arithmetic (0.5 / 0.75 = 0.67); tests/test_link_bench.py checks these constants.
SIM_GENERIC_COMPUTE, SIM_GENERIC_BANDWIDTH = 0.75, 0.75
SIM_HARDWARE = "ryzen-ai-max-395"  # any catalog entry without calibrated factors for torch; only its memory is used

ROW_KEYS = ("link", "codec", "prompt_tokens", "prefill_s", "transfer_s", "exposed_s", "theory_exposed_s",
            "ttft_disagg_s", "ttft_colocated_s", "sim_ttft_s", "decision")


@dataclass(frozen=True)
class LinkClass:
    """One home link as the bench shapes it: payload-carrying line rate, one-way delay, jitter."""

    name: str
    gbit_s: float
    delay_ms: float
    jitter_ms: float
    source: str
    scaled: bool = False  # gbit_s is the real link's; the bench shapes it scaled to this machine (scaled_link)


# Rates are line rates (tbf counts IP packets, so TCP payload gets ~94 % of them, as on Ethernet);
# delays are one way. Figures from scheduler/catalog.py's LINKS and docs/catalog.md's sources.
LINK_CLASSES: dict[str, LinkClass] = {c.name: c for c in (
    LinkClass("1gbe", 1.0, 0.1, 0.0, "1000BASE-T; ~0.1 ms one way through a switch and two OS stacks"),
    LinkClass("2.5gbe", 2.5, 0.1, 0.0, "2.5GBASE-T; as 1 GbE"),
    LinkClass("10gbe", 10.0, 0.05, 0.0, "10GBASE-T; ~50 us one way"),
    LinkClass("wifi6", 0.6, 2.0, 1.0, "802.11ax 2x2 80 MHz: 1.2 Gbit/s PHY, about half left after MAC and "
                                      "contention (the catalog says 0.66); 2 ms one way, +-1 ms jitter"),
)}


# A link scaled to this machine keeps a real link's rate-to-prefill proportion: what makes
# int8 matter is a link slower than the prefill node's KV production (DESIGN: link bandwidth
# >= KV bytes per token x prefill tokens per second). The reference pair is DESIGN's: a DGX
# Spark prefilling Llama-3.1-8B in bf16 (128 KiB of KV per token), 8,192 tokens in 1.47 s
# (exo's measurement), i.e. 730 MB/s of KV, against 1 GbE. On a node that produces KV at
# R MB/s the scaled link runs at 1 Gbit/s x R / 730: the same proportion, a far slower wire.
REFERENCE_KV_MB_S = 8192 * 128 * 1024 / 1.47 / 1e6
SCALED_LINK_CLASSES: dict[str, LinkClass] = {c.name: c for c in (
    LinkClass("1gbe-scaled", 1.0, 0.1, 0.0, "1 GbE's rate-to-prefill proportion (Spark -> Mac, 8B bf16: 730 MB/s "
                                            "of KV against 1 Gbit/s) on this machine's prefill node: 1 Gbit/s x "
                                            "(its KV MB/s, from its prefill probe) / 730. Not 1 GbE", scaled=True),
)}
KNOWN_LINK_CLASSES = {**LINK_CLASSES, **SCALED_LINK_CLASSES}


def parse_links(text: str) -> tuple[LinkClass, ...]:
    """``"1gbe,wifi6"`` -> the link classes, in order; ValueError naming an unknown one."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--emulate needs at least one link class: {', '.join(KNOWN_LINK_CLASSES)}")
    unknown = [n for n in names if n not in KNOWN_LINK_CLASSES]
    if unknown:
        raise ValueError(f"unknown link class {unknown[0]!r}; known: {', '.join(KNOWN_LINK_CLASSES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--emulate names a link twice: {text!r}")
    return tuple(KNOWN_LINK_CLASSES[n] for n in names)


def kv_rate_mb_s(probe: Sequence[Sequence[float]], kv_bytes_per_token: float, near_tokens: int) -> float:
    """MB/s of KV a node produces at its operating point: tokens x bytes per token / seconds of
    the prefill probe's point nearest ``near_tokens`` (the run's longest prompt; by ratio), since
    the rate falls as attention grows with the prompt."""
    if not probe:
        raise ValueError("the prefill node reported no prefill probe: a scaled link needs its KV rate")
    tokens, seconds = min(probe, key=lambda point: max(point[0], near_tokens) / min(point[0], near_tokens))
    return tokens * kv_bytes_per_token / seconds / 1e6


def scaled_link(link: LinkClass, kv_mb_s: float) -> LinkClass:
    """``link`` at this machine's scale: its rate x ``kv_mb_s`` / ``REFERENCE_KV_MB_S`` (see above)."""
    if not link.scaled:
        return link
    return replace(link, gbit_s=link.gbit_s * kv_mb_s / REFERENCE_KV_MB_S,
                   source=f"{link.source}; here {kv_mb_s:.1f} MB/s of KV")


def parse_list(text: str, flag: str, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not items:
        raise ValueError(f"{flag} needs at least one value")
    if allowed is not None and (bad := [i for i in items if i not in allowed]):
        raise ValueError(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    return items


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in parse_list(text, flag))
    except ValueError as e:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from e
    if any(v < 16 for v in values):
        raise ValueError(f"{flag}: prompt lengths must be >= 16 tokens, got {text!r}")
    return values


# ---------------------------------------------------------------- theory


def transfer_time(num_bytes: float, gbps: float, latency_s: float) -> float:
    """Seconds to move ``num_bytes`` at ``gbps`` (payload Gbit/s), plus one latency."""
    return num_bytes * 8 / (gbps * 1e9) + latency_s


def theory_exposed(num_bytes: float, prefill_s: float, gbps: float, latency_s: float) -> float:
    """``max(0, T_transfer - T_prefill)``: streamed layer by layer from the first chunk on, the
    transfer overlaps prefill and only what outlasts it is exposed."""
    return max(0.0, transfer_time(num_bytes, gbps, latency_s) - prefill_s)


def exposed_meets(measured_s: float, theory_s: float) -> bool:
    """Within 10 % of theory, or within 20 ms (what counts where theory is ~0)."""
    return abs(measured_s - theory_s) <= max(EXPOSED_REL_TOL * theory_s, EXPOSED_ABS_TOL_S)


def sim_meets(sim_s: float | None, measured_s: float | None) -> bool | None:
    if sim_s is None or not measured_s:
        return None
    return abs(sim_s - measured_s) <= SIM_REL_TOL * measured_s


def physics(ttft_disagg_s: float | None, ttft_colocated_s: float | None) -> str | None:
    """The placement the measurements favour under the conditional policy's own rule: remote
    prefill only when it beats the decode node prefilling itself by more than ``MIN_GAIN``."""
    if ttft_disagg_s is None or ttft_colocated_s is None:
        return None
    return "disaggregated" if ttft_colocated_s - ttft_disagg_s > MIN_GAIN * ttft_colocated_s else "colocated"


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class LinkMeasure:
    """The link as the scheduler's probe measured it, and as it was shaped."""

    gbps: float
    latency_s: float
    shaped_gbit_s: float
    shaped_delay_ms: float | None  # None: the kernel could not emulate delay (no netem)


def placement_of(stats: dict[str, Any]) -> str:
    return "colocated" if stats.get("prefill_node") == stats.get("decode_node") else "disaggregated"


def codec_of(stats: dict[str, Any]) -> str:
    """The codec the KV crossed the link in, as the response names it (older servers: ``codec``)."""
    return str(stats.get("kv_codec") or stats.get("codec") or "raw")


def _median(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def build_row(link: str, codec: str, prompt_tokens: int, disagg: Sequence[dict], colocated: Sequence[dict],
              conditional: Sequence[dict], measure: LinkMeasure, sim: dict[str, Any] | None,
              warmups: Mapping[str, Sequence[dict]] | None = None) -> dict[str, Any]:
    """One row from the ``pdcluster`` objects of its requests (medians over repeats). ``sim``:
    ``{"ttft_s", "placement", "ttft_disagg_s", "ttft_colocated_s"}`` from ``read_sim``, or None.
    ``warmups``: the same prompt length's warm-up requests per placement (``disaggregated`` in
    this row's codec, ``colocated``), the yardstick of how steady the machine was (``steady_*``)."""
    theory = [theory_exposed(s["kv_bytes"], s["prefill_s"], measure.gbps, measure.latency_s) for s in disagg]
    row: dict[str, Any] = {
        "link": link, "codec": codec,
        "prompt_tokens": int(_median([s.get("prompt_tokens") for s in disagg + colocated]) or prompt_tokens),
        "prefill_s": _r(_median([s["prefill_s"] for s in disagg])),
        "transfer_s": _r(_median([s["transfer_s"] for s in disagg])),
        "exposed_s": _r(_median([s["exposed_transfer_s"] for s in disagg])),
        "theory_exposed_s": _r(_median(theory)),
        "ttft_disagg_s": _r(_median([s["ttft_s"] for s in disagg])),
        "ttft_colocated_s": _r(_median([s["ttft_s"] for s in colocated])),
        "sim_ttft_s": _r(sim["ttft_s"]) if sim else None,
        "decision": placement_of(conditional[0]) if conditional else None,
    }
    row.update(_row_extras(row, disagg, colocated, conditional, measure, sim))
    row.update(_steadiness(row, warmups or {}))
    return row


def _steadiness(row: dict[str, Any], warmups: Mapping[str, Sequence[dict]]) -> dict[str, Any]:
    """How far the warm-ups' own median TTFT lies from the row's measured one, for the placement
    the simulator is compared in: what the same requests, measured minutes apart on the same
    machine, predict of each other. A simulator cannot be held closer than this."""
    placement = row.get("sim_placement") or "disaggregated"
    measured = row["ttft_disagg_s"] if placement == "disaggregated" else row["ttft_colocated_s"]
    earlier = _median([s["ttft_s"] for s in warmups.get(placement, ())])
    error = (earlier - measured) / measured if earlier is not None and measured else None
    return {"steady_ttft_s": _r(earlier), "steady_error": _r(error, 3),
            "steady_target_met": None if error is None else abs(error) <= SIM_REL_TOL}


def _row_extras(row: dict, disagg: Sequence[dict], colocated: Sequence[dict], conditional: Sequence[dict],
                measure: LinkMeasure, sim: dict[str, Any] | None) -> dict[str, Any]:
    codecs = sorted({codec_of(s) for s in disagg})
    exposed, theory = row["exposed_s"], row["theory_exposed_s"]
    sim_placement = sim["placement"] if sim else None
    measured_for_sim = row["ttft_disagg_s"] if sim_placement == "disaggregated" else row["ttft_colocated_s"]
    best = physics(row["ttft_disagg_s"], row["ttft_colocated_s"])
    return {
        "codec_used": ",".join(codecs) or None,
        "kv_bytes": int(_median([s["kv_bytes"] for s in disagg]) or 0),
        "link_gbps": _r(measure.gbps), "link_latency_ms": _r(measure.latency_s * 1e3, 3),
        "shaped_gbit_s": measure.shaped_gbit_s, "shaped_delay_ms": measure.shaped_delay_ms,
        "ttft_conditional_s": _r(_median([s["ttft_s"] for s in conditional])),
        # TTFT outside queue, prefill and exposed transfer (RPCs, the first token's trip): measured, not modelled
        "post_s": _r(_median([s["ttft_s"] - s.get("queue_s", 0.0) - s["prefill_s"] - s["exposed_transfer_s"]
                              for s in disagg])),
        "physics": best,
        "decision_matches_physics": None if best is None or row["decision"] is None else best == row["decision"],
        "sim_placement": sim_placement,
        "sim_ttft_disagg_s": _r(sim["ttft_disagg_s"]) if sim else None,
        "sim_ttft_colocated_s": _r(sim["ttft_colocated_s"]) if sim else None,
        "sim_error": _r((sim["ttft_s"] - measured_for_sim) / measured_for_sim, 3) if sim and measured_for_sim else None,
        "exposed_target_met": None if exposed is None or theory is None else exposed_meets(exposed, theory),
        "sim_target_met": sim_meets(row["sim_ttft_s"], measured_for_sim),
        "repeats": len(disagg),
    }


def check_row(row: dict[str, Any]) -> None:
    """ValueError naming the first missing key or mistyped value of a row's schema."""
    for key in ROW_KEYS:
        if key not in row:
            raise ValueError(f"row lacks {key!r}: {row}")
    if not isinstance(row["link"], str) or not isinstance(row["codec"], str) or not isinstance(row["prompt_tokens"], int):
        raise TypeError(f"row's link, codec or prompt_tokens has the wrong type: {row}")
    for key in ROW_KEYS[3:10]:
        if row[key] is not None and not isinstance(row[key], (int, float)):
            raise TypeError(f"row's {key} is not a number: {row[key]!r}")
    if row["decision"] not in ("disaggregated", "colocated", None):
        raise ValueError(f"row's decision is {row['decision']!r}")


# ---------------------------------------------------------------- the simulator's inputs and answer


def sim_cluster_toml(prefill: dict[str, Any], decode: dict[str, Any], gbps: float, latency_s: float) -> str:
    """A ``pdc simulate`` cluster file for the two workers as ``/health`` lists them (their
    start-up measurements, the prefill probe and engine device included, and what the scheduler
    learned from their served requests, ``served``) and the probed link. See
    ``SIM_GENERIC_COMPUTE`` for the scaling; a probe prices prefill the same way in both."""
    def node(n: dict[str, Any]) -> str:
        roles = ", ".join(f'"{r}"' for r in n["roles"])
        def pairs(points: Any) -> str:  # [[tokens, figure], ...] as TOML
            return ", ".join(f"[{int(tokens)}, {float(figure)!r}]" for tokens, figure in points or ())

        probe = pairs(n.get("prefill_probe"))
        served = n.get("served") or {}  # what the scheduler learned from the warm-ups
        points = served.get("prefill_points") or {}
        scales = {mode: f"[{pairs(points[mode])}]" if mode in points else repr(float(value))
                  for mode, value in (served.get("prefill_scale") or {}).items()}
        overheads = {kind: repr(float(v)) for kind, v in (served.get("overhead_s") or {}).items()}
        tables = "".join(f"{name} = {{{', '.join(f'{k} = {v}' for k, v in table.items())}}}\n"
                         for name, table in (("prefill_scale", scales), ("request_overhead_s", overheads)) if table)
        return (f'[[nodes]]\nname = "{n["node_id"]}"\nhardware = "{SIM_HARDWARE}"\nroles = [{roles}]\n'
                f'engine = "torch"\ndevice = "{n.get("device") or ""}"\n'
                f'tflops = {n["tflops"] / SIM_GENERIC_COMPUTE!r}\n'
                f'mem_bw_gbps = {n["mem_bw_gbps"] / SIM_GENERIC_BANDWIDTH!r}\n'
                + (f"prefill_probe = [{probe}]\n" if probe else "") + tables)
    link = (f'[[links]]\nnodes = ["{prefill["node_id"]}", "{decode["node_id"]}"]\n'
            f"gbit_s = {gbps!r}\nlatency_s = {latency_s!r}\n")
    return f'name = "pdc bench link"\n\n{node(prefill)}\n{node(decode)}\n{link}'


SIM_SPACING_S = 1000.0  # trace arrivals this far apart never meet


def sim_trace(prompt_tokens: Sequence[int]) -> str:
    """JSONL: one lone request per prompt length (one output token: TTFT is the point)."""
    return "".join(json.dumps({"arrival_s": i * SIM_SPACING_S, "prompt_tokens": n, "output_tokens": 1}) + "\n"
                   for i, n in enumerate(prompt_tokens))


SIM_POLICIES = {"colocated": "ttft_colocated_s", "fastest-pair": "ttft_disagg_s", "conditional": "ttft_s"}


def read_sim(answer: dict[str, Any], prompt_tokens: Sequence[int]) -> dict[int, dict[str, Any]]:
    """``pdc simulate --json`` over ``sim_trace(prompt_tokens)`` -> per prompt length: the
    conditional policy's TTFT and placement, and TTFT forced each way (``colocated`` keeps
    prefill on the decode node; ``fastest-pair`` prefills on the prefill node)."""
    out: dict[int, dict[str, Any]] = {n: {} for n in prompt_tokens}
    for policy, key in SIM_POLICIES.items():
        requests = sorted(answer["policies"][policy]["requests"], key=lambda r: r["arrival_s"])
        for n, request in zip(prompt_tokens, requests):
            out[n][key] = request["ttft_s"]
            if policy == "conditional":
                out[n]["placement"] = placement_of(request)
    return out


# ---------------------------------------------------------------- output


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec) if isinstance(value, float) else str(value)


TABLE = (("link", "link", ""), ("codec", "codec", ""), ("used", "codec_used", ""), ("tokens", "prompt_tokens", ""),
         ("MB", "kv_bytes", ""), ("Gbit/s", "link_gbps", ".2f"), ("prefill", "prefill_s", ".3f"),
         ("transfer", "transfer_s", ".3f"), ("exposed", "exposed_s", ".3f"), ("theory", "theory_exposed_s", ".3f"),
         ("ok", "exposed_target_met", ""), ("TTFT disagg", "ttft_disagg_s", ".3f"),
         ("TTFT coloc", "ttft_colocated_s", ".3f"), ("sim", "sim_ttft_s", ".3f"), ("sim err", "sim_error", "+.0%"),
         ("ok", "sim_target_met", ""), ("decision", "decision", ""), ("physics", "physics", ""))


def table_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows as a fixed-width text table (seconds; MB = 10^6 bytes on the wire)."""
    header = [h for h, _, _ in TABLE]
    body = [[(f"{row['kv_bytes'] / 1e6:.1f}" if key == "kv_bytes" else _fmt(row.get(key), spec))
             for _, key, spec in TABLE] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *body]]


def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    def count(key: str) -> str:
        judged = [r[key] for r in rows if r.get(key) is not None]
        return f"{sum(judged)} of {len(judged)}"
    return [f"exposed transfer within 10 % (or 20 ms) of theory: {count('exposed_target_met')} rows",
            f"simulator within 20 % of measured TTFT: {count('sim_target_met')} rows",
            (f"the warm-ups' own TTFT within 20 % of the rows' (how steady the machine was): "
             f"{count('steady_target_met')} rows"),
            f"conditional decision agrees with the measured faster placement: {count('decision_matches_physics')} rows"]


def plot(rows: Sequence[dict[str, Any]], path: str, title: str) -> str:
    """Per link: exposed vs theory (top) and TTFT disaggregated / colocated / simulated (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(2, len(links), figsize=(4.2 * len(links), 7), squeeze=False, sharex=True)
    for col, link in enumerate(links):
        mine = [r for r in rows if r["link"] == link]
        top, bottom = axes[0][col], axes[1][col]
        for codec in dict.fromkeys(r["codec"] for r in mine):
            rs = sorted((r for r in mine if r["codec"] == codec), key=lambda r: r["prompt_tokens"])
            xs = [r["prompt_tokens"] for r in rs]
            line, = top.plot(xs, [r["exposed_s"] for r in rs], "o-", label=f"{codec} measured")
            top.plot(xs, [r["theory_exposed_s"] for r in rs], "x--", color=line.get_color(), label=f"{codec} theory")
            bottom.plot(xs, [r["ttft_disagg_s"] for r in rs], "o-", color=line.get_color(), label=f"disagg {codec}")
            bottom.plot(xs, [r["sim_ttft_disagg_s"] for r in rs], ":", color=line.get_color(),
                        label=f"sim disagg {codec}")
        rs = sorted((r for r in mine if r["codec"] == mine[0]["codec"]), key=lambda r: r["prompt_tokens"])
        xs = [r["prompt_tokens"] for r in rs]
        bottom.plot(xs, [r["ttft_colocated_s"] for r in rs], "s-", color="black", label="colocated")
        bottom.plot(xs, [r["sim_ttft_colocated_s"] for r in rs], ":", color="black", label="sim colocated")
        top.set_title(f"{link} ({mine[0]['link_gbps']:.2f} Gbit/s measured)")
        top.set_ylabel("exposed transfer (s)")
        bottom.set_ylabel("TTFT (s)")
        bottom.set_xlabel("prompt tokens")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_json(rows: Sequence[dict[str, Any]], **head: Any) -> str:
    """The ``--json`` line: ``{"rows": [...]}`` (plus ``head``'s run details)."""
    return json.dumps({"rows": list(rows), **head})


def as_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)
