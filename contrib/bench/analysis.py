"""The statistics of one case, from the sink's raw records and the sender's totals.

The sink (udpload.c) writes one fixed-size record per datagram received; everything here is
computed from those with numpy, so the sink only copies 24 bytes per datagram.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

# The sink's ``struct record``: send time, receive time (CLOCK_MONOTONIC ns), seq, kind.
RECORD = np.dtype([("send_ns", "<i8"), ("recv_ns", "<i8"), ("seq", "<u4"), ("kind", "<u4")])
STEADY, BURST = 0, 1  # the kind of a datagram: the steady stream, or the burst
BIN_NS = 100_000_000  # time series: 100 ms bins of send time
RECOVERED_NS = 2_000_000  # "back under 2 ms": the latency a recovered stream stays below
WINDOW_NS = 1_000_000_000  # the 1 s windows after a burst or a freeze
MS = 1e6  # ns per ms


def load(path: Path) -> np.ndarray:
    """The records a sink wrote (none if it wrote no file)."""
    return np.fromfile(path, dtype=RECORD) if path.exists() else np.zeros(0, RECORD)


def latency_ns(records: np.ndarray) -> np.ndarray:
    return records["recv_ns"] - records["send_ns"]


def summarize(latency: np.ndarray) -> dict[str, float | None]:
    """p50, p99 and maximum latency in ms; None for each if nothing arrived."""
    if latency.size == 0:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    p50, p99 = np.percentile(latency, [50, 99])
    return {"p50_ms": p50 / MS, "p99_ms": p99 / MS, "max_ms": float(latency.max()) / MS}


def series(records: np.ndarray, start_ns: int) -> dict[str, list[Any]]:
    """Per 100 ms of send time since the start: datagrams delivered, p50, p99 and max (ms)."""
    if records.size == 0:
        return {"bin_ms": BIN_NS / MS, "count": [], "p50_ms": [], "p99_ms": [], "max_ms": []}
    bins = (records["send_ns"] - start_ns) // BIN_NS
    bins = np.maximum(bins, 0)
    order = np.argsort(bins, kind="stable")
    lat = latency_ns(records)[order]
    edges = np.searchsorted(bins[order], np.arange(int(bins.max()) + 2))
    out: dict[str, list[Any]] = {"count": [], "p50_ms": [], "p99_ms": [], "max_ms": []}
    for lo, hi in itertools.pairwise(edges):
        part = lat[lo:hi]
        stats = summarize(part)
        out["count"].append(int(part.size))
        for key in ("p50_ms", "p99_ms", "max_ms"):
            value = stats[key]
            out[key].append(None if value is None else round(value, 4))
    return {"bin_ms": BIN_NS / MS, **out}


def flow_stats(records: np.ndarray, sender: dict[str, Any], size: int) -> dict[str, Any]:
    """Counts, rates and latency of one direction of traffic.

    Rates are over the sender's active time: offered is what it sent per second, delivered
    what arrived (each sequence number once) per second of that same time.
    """
    seconds = max((sender["send_end_ns"] - sender["send_start_ns"]) / 1e9, 1e-9)
    seqs = records["seq"]
    unique = int(np.unique(seqs).size)
    reordered = 0
    if seqs.size > 1:
        reordered = int(np.count_nonzero(seqs[1:] < np.maximum.accumulate(seqs)[:-1]))
    sent = int(sender["sent"])
    delivered_rate = unique / seconds
    return {
        "size": size,
        "seconds": seconds,
        "sent": sent,
        "sent_burst": int(sender["sent_burst"]),
        "send_errors": int(sender["send_errors"]),
        "stalls": int(sender["stalls"]),
        "received": int(records.size),
        "delivered": unique,
        "duplicates": int(records.size) - unique,
        "reordered": reordered,
        "lost": sent - unique,
        "loss_pct": 100.0 * (sent - unique) / sent if sent else 0.0,
        "offered_per_s": sent / seconds,
        "delivered_per_s": delivered_rate,
        "mbit_per_s": delivered_rate * size * 8 / 1e6,
        **summarize(latency_ns(records)),
        "series": series(records, sender["send_start_ns"]),
    }


def recovery(records: np.ndarray, after_ns: int, end_ns: int, rate: float) -> dict[str, Any]:
    """How the steady stream fared after an event that ended at ``after_ns`` (burst, freeze).

    ``p99_first_s_ms``: p99 of the steady datagrams sent in the 1 s after it;
    ``p99_second_s_ms``: the same for the 1 s after that, which is the figure "back under
    2 ms within 1 s" is judged by; ``recovered_after_ms``: from the event to the send time
    of the last steady datagram later than 2 ms (0 if none was). ``steady_in_windows``
    counts the steady datagrams of each window that arrived, ``expected_in_windows`` how
    many were sent at ``rate`` before the sender stopped at ``end_ns``: a stream that stopped
    arriving has not recovered either.
    """
    steady = records[records["kind"] == STEADY]
    lat = latency_ns(steady)
    sent_at = steady["send_ns"] - after_ns
    first = (sent_at >= 0) & (sent_at < WINDOW_NS)
    second = (sent_at >= WINDOW_NS) & (sent_at < 2 * WINDOW_NS)
    late = (sent_at >= 0) & (lat > RECOVERED_NS)
    return {
        "p99_first_s_ms": summarize(lat[first])["p99_ms"],
        "p99_second_s_ms": summarize(lat[second])["p99_ms"],
        "recovered_after_ms": float(sent_at[late].max()) / MS if late.any() else 0.0,
        "steady_in_windows": [int(first.sum()), int(second.sum())],
        "expected_in_windows": [
            round(rate * max(0, min(end_ns - after_ns, (i + 1) * WINDOW_NS) - i * WINDOW_NS) / 1e9)
            for i in range(2)
        ],
    }


# Below the p99, for the WAN cases: at 1% loss the datagrams in the lost segments alone are
# 1% of the stream, so the p99 is their recovery time whatever the tunnel does about the
# datagrams behind them; p90-p98 show the latter.
TAIL_PERCENTILES = (90, 95, 98)


def combined_latency(record_sets: list[np.ndarray]) -> dict[str, float | None]:
    """p50, p99 and max over every datagram of every direction, and the TAIL_PERCENTILES."""
    if not record_sets:
        record_sets = [np.zeros(0, RECORD)]
    latency = np.concatenate([latency_ns(r) for r in record_sets])
    stats: dict[str, float | None] = summarize(latency)
    for q in TAIL_PERCENTILES:
        stats[f"p{q}_ms"] = float(np.percentile(latency, q)) / MS if latency.size else None
    return stats
