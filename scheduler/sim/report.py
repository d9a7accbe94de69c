"""Simulator reports: summary statistics, the readable table, the JSON, the plot."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scheduler.request import RequestStats

MAX_ROWS = 20  # per-request rows in the readable table


@dataclass(frozen=True)
class Percentiles:
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        return cls(*(percentile(values, p) if values else None for p in (50, 90, 99)))

    def to_json(self) -> dict:
        return {k: (None if v is None else round(v, 6)) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Summary:
    """Latency percentiles, throughput and goodput of one run."""

    num_requests: int
    duration_s: float  # first arrival -> last token
    ttft_s: Percentiles
    tpot_s: Percentiles  # over requests with more than one output token
    e2e_s: Percentiles
    throughput_tok_s: float  # output tokens / duration
    goodput_req_s: float  # requests meeting both SLOs / duration
    num_within_slo: int
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None

    def to_json(self) -> dict:
        out = {}
        for key, value in self.__dict__.items():
            out[key] = value.to_json() if isinstance(value, Percentiles) else (
                round(value, 6) if isinstance(value, float) else value)
        return out


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between order statistics
    (numpy's default method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * p / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def meets_slo(result: RequestStats, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Within both SLOs (an SLO not given always holds; so does TPOT for one output token)."""
    ttft_ok = slo_ttft_s is None or result.ttft_s <= slo_ttft_s
    tpot_ok = slo_tpot_s is None or result.tpot_s is None or result.tpot_s <= slo_tpot_s
    return ttft_ok and tpot_ok


def summarize(results: Sequence[RequestStats], slo_ttft_s: float | None = None,
              slo_tpot_s: float | None = None) -> Summary:
    start = min(r.arrival_s for r in results)
    duration = max(r.arrival_s + r.e2e_s for r in results) - start
    within = sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in results)
    return Summary(
        num_requests=len(results),
        duration_s=duration,
        ttft_s=Percentiles.of([r.ttft_s for r in results]),
        tpot_s=Percentiles.of([r.tpot_s for r in results if r.tpot_s is not None]),
        e2e_s=Percentiles.of([r.e2e_s for r in results]),
        throughput_tok_s=sum(r.completion_tokens for r in results) / duration,
        goodput_req_s=within / duration,
        num_within_slo=within,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
    )


# ---------------------------------------------------------------- table


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def request_table(results: Sequence[RequestStats]) -> str:
    """One row per request: placement and where its time went."""
    header = ("request", "arrive s", "prefill -> decode", "codec", "queue s", "prefill s", "transfer s", "exposed s",
              "ttft s", "tpot ms", "e2e s")
    rows = [
        (r.request_id, _s(r.arrival_s),
         f"{r.decode_node} (colocated)" if r.colocated else f"{r.prefill_node} -> {r.decode_node}",
         r.kv_codec or "-", _s(r.queue_s), _s(r.prefill_s), _s(r.transfer_s), _s(r.exposed_transfer_s), _s(r.ttft_s), _ms(r.tpot_s),
         _s(r.e2e_s))
        for r in results
    ]
    return _format(header, rows)


def summary_table(summaries: dict[str, Summary]) -> str:
    """One row per policy."""
    header = ("policy", "requests", "ttft p50/p90/p99 s", "tpot p50/p90/p99 ms", "e2e p50/p90/p99 s",
              "tok/s", "goodput req/s")
    rows = [
        (name, str(s.num_requests),
         "/".join(_s(v) for v in (s.ttft_s.p50, s.ttft_s.p90, s.ttft_s.p99)),
         "/".join(_ms(v) for v in (s.tpot_s.p50, s.tpot_s.p90, s.tpot_s.p99)),
         "/".join(_s(v) for v in (s.e2e_s.p50, s.e2e_s.p90, s.e2e_s.p99)),
         f"{s.throughput_tok_s:.1f}",
         f"{s.goodput_req_s:.3f} ({s.num_within_slo}/{s.num_requests})" if _has_slo(s) else "- (no SLO)")
        for name, s in summaries.items()
    ]
    return _format(header, rows)


def _has_slo(summary: Summary) -> bool:
    return summary.slo_ttft_s is not None or summary.slo_tpot_s is not None


def _format(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def text_report(runs: dict[str, tuple[list[RequestStats], Summary]]) -> str:
    """The readable report: per-request rows (up to MAX_ROWS requests) per policy, then the summary."""
    parts = []
    for name, (results, _) in runs.items():
        if len(results) <= MAX_ROWS:
            parts.append(f"policy {name}:\n{request_table(results)}")
        else:
            parts.append(f"policy {name}: {len(results)} requests (per-request rows are shown for up to "
                         f"{MAX_ROWS}; --json lists them all)")
    summaries = {name: summary for name, (_, summary) in runs.items()}
    slo = next(iter(summaries.values()))
    slo_note = "" if slo.slo_ttft_s is None and slo.slo_tpot_s is None else (
        f" (SLO: ttft <= {_s(slo.slo_ttft_s)} s, tpot <= {_ms(slo.slo_tpot_s)} ms)")
    parts.append(f"summary{slo_note}:\n{summary_table(summaries)}")
    return "\n\n".join(parts)


# ---------------------------------------------------------------- plot


def _legend_labels(series: dict[str, list[Point]]) -> dict[str, str]:
    """Policy names for the legend; a policy whose points equal an earlier one's
    says so ("conditional (= fastest-pair)"), since their lines coincide."""
    labels: dict[str, str] = {}
    for name, points in series.items():
        same = next((other for other in labels if series[other] == points), None)
        labels[name] = f"{name} (= {same})" if same else name
    return labels


class PlotError(ValueError):
    """The plot cannot be drawn (matplotlib missing)."""


@dataclass(frozen=True)
class Point:
    x: float
    ttft_p50_s: float
    e2e_p50_s: float


def plot(series: dict[str, list[Point]], xlabel: str, title: str, out: str | Path, *, log_x: bool = False) -> Path:
    """Two panels, p50 TTFT and p50 end-to-end latency against ``xlabel``, one line per policy."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    labels = _legend_labels(series)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    styles = list(zip("osD^vPX*", ["-", "--", "-.", ":"] * 2))  # policies that agree still show apart
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    some = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else "")
    for ax, metric, label in ((axes[0], "ttft_p50_s", "TTFT p50 (s)"), (axes[1], "e2e_p50_s", "end-to-end p50 (s)")):
        for i, (name, points) in enumerate(series.items()):
            marker, line = styles[i % len(styles)]
            ax.plot([p.x for p in points], [getattr(p, metric) for p in points], marker=marker, linestyle=line,
                    markersize=8 - i % 4, label=labels[name], alpha=0.85)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.set_yscale("log")  # latencies span orders of magnitude between policies
        ax.yaxis.set_major_formatter(plain)  # 60, not 6x10^1
        ax.yaxis.set_minor_formatter(some)  # 2, 5, 20, 50: readable when a panel spans about one decade
        if log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plain)
        ax.grid(True, which="both", alpha=0.3)
    handles, _ = axes[0].get_legend_handles_labels()
    fig.legend(handles, list(labels.values()), loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
    fig.suptitle(title)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
