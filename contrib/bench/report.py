"""The benchmark's outputs: progress lines, the table, the targets of issue 3, the plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

PROXIED = "ours+squid"  # ours, its client's TCP through squid (HTTP CONNECT)
RESILIENT = "ours+conns"  # ours with --connections N on both ends (issue 13)
SUBJECT_ORDER = ("kernel", "original", "ours", PROXIED, RESILIENT)
MB = 1_000_000  # bytes: "60 MB" in the issue is decimal
CAPACITY_FOR = {64: "capacity-64", 1400: "capacity-1400"}  # overload size -> its capacity
SHORT = 0.99  # a recovery window with fewer of its steady datagrams than this: some missing
P99_WINDOWS = ("p99_first_s_ms", "p99_second_s_ms")

Case = dict[str, Any]


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.3f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def progress(name: str, subject: str, case: Case, elapsed: float) -> None:
    total = case["total"]
    print(
        f"  {name:22} {subject:10} {total['delivered_per_s']:>10,.0f}/s  "
        f"loss {total['loss_pct']:6.2f}%  p99 {fmt_ms(total['p99_ms']):>7} ms  "
        f"({elapsed:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def header(info: dict[str, Any], quick: bool, pin: str) -> str:
    return (
        f"udptunnel benchmark{' (--quick)' if quick else ''}: {info['nproc']} CPUs "
        f"({info['cpu_model']}), Linux {info['kernel']}, Python {info['python']}, "
        f"repository {info['repository']}, pinning: {pin}"
    )


COLUMNS = (
    f"{'subject':11}{'offered/s':>10}{'deliv/s':>10}{'Mbit/s':>8}{'loss%':>7}"
    f"{'p50':>8}{'p99':>8}{'max':>8}{'srv':>7}{'cli':>7}{'both':>7}{'load':>7}  notes"
)
LEGEND = (
    "Rates are datagrams/s (both directions added up), Mbit/s counts UDP payload, latency is\n"
    "one-way in ms (p50/p99/max), srv/cli/both are tunnel CPU us per delivered datagram\n"
    "(server end in tunA, client end in tunB), load the same for udpload (generator + sink).\n"
    "Capacity (closed loop, at most 64 datagrams in flight) is one-way, appA to appB.\n"
    f"{PROXIED}: ours with its client through squid in tunB; squid's CPU is in the notes.\n"
    f"{RESILIENT}: ours with --connections N on both ends (N in the notes), in the WAN cases."
)


def table(results: dict[str, Any]) -> str:
    lines = [LEGEND, "", COLUMNS]
    scenarios = results["scenarios"]
    for name, entry in scenarios.items():
        lines.append(f"{name}: {entry['title']}")
        for subject in SUBJECT_ORDER:
            case = entry["subjects"].get(subject)
            if case and not measured(case):
                lines.append(f"  {subject:11}failed: {case['error'][:150]}")
            elif case:
                lines.append(row(subject, case, notes(name, entry, subject, results)))
    if results["sweep"]:
        lines.append("sweep: 200 B paced, p99 ms (delivered %) at each offered rate")
        rates = list(results["sweep"])
        for subject in SUBJECT_ORDER:
            cells = []
            for rate in rates:
                case = results["sweep"][rate].get(subject)
                if measured(case):
                    total = case["total"]
                    delivered = 100 - total["loss_pct"]
                    cells.append(
                        f"{int(rate) // 1000}k {fmt_ms(total['p99_ms'])} ({delivered:.0f}%)"
                    )
            if cells:
                lines.append(f"  {subject:11}" + "  ".join(cells))
    return "\n".join(lines)


def row(subject: str, case: Case, note: str) -> str:
    total, cpu = case["total"], case["cpu_us_per_datagram"]
    return (
        f"  {subject:11}{total['offered_per_s']:>8,.0f}{total['delivered_per_s']:>10,.0f}"
        f"{total['mbit_per_s']:>8.1f}{total['loss_pct']:>7.2f}"
        f"{fmt_ms(total['p50_ms']):>8}{fmt_ms(total['p99_ms']):>8}{fmt_ms(total['max_ms']):>8}"
        f"{fmt_us(cpu.get('server')):>7}{fmt_us(cpu.get('client')):>7}"
        f"{fmt_us(cpu.get('both')):>7}{fmt_us(cpu.get('load')):>7}  {note}"
    ).rstrip()


def measured(case: Case | None) -> bool:
    """A case that ran to the end (one that failed holds only its error)."""
    return bool(case) and "error" not in case


def rate(results: dict[str, Any], scenario: str, subject: str) -> float | None:
    case = results["scenarios"].get(scenario, {}).get("subjects", {}).get(subject)
    return case["total"]["delivered_per_s"] if measured(case) else None


def notes(name: str, entry: dict[str, Any], subject: str, results: dict[str, Any]) -> str:
    case = entry["subjects"][subject]
    total, kind = case["total"], entry["kind"]
    parts = []
    if kind == "capacity":
        kernel = rate(results, name, "kernel")
        if kernel and subject != "kernel":
            parts.append(f"{100 * total['delivered_per_s'] / kernel:.0f}% of kernel")
        original = rate(results, name, "original")
        if subject == "ours" and original:
            parts.append(f"{total['delivered_per_s'] / original:.1f}x original")
        if "rounds" in case:
            each = "/".join(f"{r['delivered_per_s'] / 1000:.0f}k" for r in case["rounds"])
            parts.append(f"median of {each}")
    if kind == "plain" and subject == "ours":
        parts.append(versus_original(case, entry["subjects"].get("original")))
    if subject == PROXIED:
        parts.append(versus_direct(case, entry["subjects"].get("ours"), kind))
    if kind == "overload":
        size = entry["flows"][0]["size"]
        capacity = rate(results, CAPACITY_FOR.get(size, ""), subject)
        if capacity:
            parts.append(f"{100 * total['delivered_per_s'] / capacity:.0f}% of capacity")
    if kind in ("flood", "soak"):
        parts.append(shares_text(case))
    if kind in ("burst", "freeze"):
        parts.append(recovery_text(case))
    if kind == "wan":
        if subject == RESILIENT:
            parts.append(f"{case['connections']} connections")
        parts.append(emulator_text(case))
    if kind == "steady":
        parts.append(drift_text(case))
    if kind == "flows" and subject != "kernel":
        opened = case["tunnel"]["server"].get("flows", 0)
        parts.append(f"{opened} flows, a TCP connection each" if opened else "one TCP for all")
    if kind == "soak" and "rss_kb" in case:
        parts.append(rss_text(case))
    if total["dropped_by_tunnel"]:
        parts.append(f"tunnel dropped {total['dropped_by_tunnel']}")
    if total["dropped_by_kernel"]:
        parts.append(f"kernel dropped {total['dropped_by_kernel']}")
    if kind not in ("burst", "freeze") and subject != "kernel" and total["unaccounted"] > 0:
        parts.append(f"{total['unaccounted']} unaccounted")
    duplicates = sum(f["duplicates"] for f in case["flows"].values())
    reordered = sum(f["reordered"] for f in case["flows"].values())
    stalls = sum(f["stalls"] for f in case["flows"].values())
    if duplicates:
        parts.append(f"{duplicates} duplicated")
    if reordered:
        parts.append(f"{reordered} reordered")
    if stalls:
        parts.append(f"{stalls} stalls")
    return "; ".join(part for part in parts if part)


def emulator_text(case: Case) -> str:
    """What the emulated WAN did: packets nftables dropped (each way, by the receiving host),
    and how late the delay line let its frames go, at worst and for 99% of them."""
    wan = case["wan"]
    line = wan["delayline"].values()
    dropped = wan["nft_dropped"]
    text = f"wan dropped A>B {dropped.get('tunB', 0)}, B>A {dropped.get('tunA', 0)} packets"
    text += f", line late p99 {max(d['late_p99_us'] for d in line):.0f} us"
    own = sum(d["queue_full"] + d["too_big"] + d["send_errors"] for d in line)
    return text + (f", line dropped {own}" if own else "")


def versus_original(case: Case, original: Case | None) -> str:
    """Ours as a multiple of the original at a paced rate: tunnel CPU per datagram (both
    ends) and median latency, the two figures of issue 10. Beware the original's p50 in
    a run where it holds each frame back until the next one comes (a period or two)."""
    if not measured(original):
        return ""
    assert original is not None
    cpu, theirs = case["cpu_us_per_datagram"]["both"], original["cpu_us_per_datagram"]["both"]
    p50, their_p50 = case["total"]["p50_ms"], original["total"]["p50_ms"]
    parts = []
    if cpu and theirs:
        parts.append(f"CPU {cpu / theirs:.1f}x original")
    if p50 and their_p50:
        parts.append(f"p50 {p50 / their_p50:.2f}x")
    return ", ".join(parts)


def versus_direct(case: Case, direct: Case | None, kind: str) -> str:
    """Through squid against ours without it: squid's own CPU per datagram, and what the
    detour costs (capacity as a share of the direct path's, or the added median latency)."""
    parts = [f"squid {fmt_us(case['cpu_us_per_datagram'].get('proxy'))} us/datagram"]
    if measured(direct):
        assert direct is not None
        mine, theirs = case["total"], direct["total"]
        if kind == "capacity" and theirs["delivered_per_s"]:
            share = mine["delivered_per_s"] / theirs["delivered_per_s"]
            parts.append(f"{100 * share:.0f}% of ours")
        elif mine["p50_ms"] is not None and theirs["p50_ms"] is not None:
            added = 1000 * (mine["p50_ms"] - theirs["p50_ms"])
            parts.append(f"p50 {added:+.0f} us against ours")
    return ", ".join(parts)


def shares(case: Case) -> dict[str, float]:
    delivered = {name: f["delivered"] for name, f in case["flows"].items()}
    total = sum(delivered.values()) or 1
    return {name: 100 * count / total for name, count in delivered.items()}


def shares_text(case: Case) -> str:
    return " ".join(f"{name} {share:.0f}%" for name, share in shares(case).items())


def worst_recovery(case: Case) -> dict[str, Any]:
    """The direction that recovered last, with unaccounted datagrams of the whole case."""
    recs = [f["recovery"] for f in case["flows"].values() if "recovery" in f]

    def badness(r: dict[str, Any]) -> tuple[float, ...]:
        second = r["p99_second_s_ms"]
        return (
            r["steady_in_windows"][1] < r["expected_in_windows"][1] * SHORT,
            float("inf") if second is None else second,
            r["recovered_after_ms"],
        )

    worst = max(recs, key=badness)
    return {**worst, "unaccounted": case["total"]["unaccounted"]}


def recovered(r: dict[str, Any]) -> bool:
    """Under 2 ms in the second 1 s after the event, with (nearly) every datagram there."""
    second = r["p99_second_s_ms"]
    arrived = r["steady_in_windows"][1] >= r["expected_in_windows"][1] * SHORT
    return second is not None and second < 2 and arrived and r["unaccounted"] <= 0


def recovery_text(case: Case) -> str:
    r = worst_recovery(case)
    first, second = (fmt_ms(r[k]) if r[k] is not None else "none" for k in P99_WINDOWS)
    text = f"steady p99 {first} / {second} ms in 1st/2nd s after"
    counts, expected = r["steady_in_windows"], r["expected_in_windows"]
    if any(c < e * SHORT for c, e in zip(counts, expected, strict=True)):
        text += f" (arrived {counts[0]}/{counts[1]} of {expected[0]}/{expected[1]})"
    return text + (
        f"; all <2 ms after {r['recovered_after_ms']:.0f} ms; unaccounted {r['unaccounted']}"
    )


def drift_text(case: Case) -> str:
    """p50 in the first and the last 10 s (or fifth) of the run: does latency creep up?"""
    series = next(iter(case["flows"].values()))["series"]
    p50 = [v for v in series["p50_ms"] if v is not None]
    if not p50:
        return ""
    span = max(1, min(100, len(p50) // 5))  # 100 bins of 100 ms: 10 s
    first, last = sorted(p50[:span]), sorted(p50[-span:])
    return (
        f"p50 {fmt_ms(first[len(first) // 2])} ms in first {span / 10:g} s, "
        f"{fmt_ms(last[len(last) // 2])} ms in last"
    )


def rss_text(case: Case) -> str:
    parts = []
    for role, samples in case["rss_kb"].items():
        if samples:
            peak = case["tunnel"][role]["VmHWM"]
            parts.append(
                f"{role} RSS {samples[0] / 1024:.1f}->{samples[-1] / 1024:.1f} MiB "
                f"(peak {peak / 1024:.1f})"
            )
    return "; ".join(parts)


# --- the WAN scenarios (issue 13) -------------------------------------------------------------

WAN_SUBJECTS = ("kernel", "original", "ours", RESILIENT)


def wan_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per WAN scenario and subject: the configured path and what went through it.

    ``added_*``: latency over the configured one-way delay (half the RTT), what the subject
    and the emulator's own wake-ups added to the path; the kernel's row shows the latter.
    """
    rows = []
    for name, entry in results["scenarios"].items():
        if entry["kind"] != "wan":
            continue
        for subject in WAN_SUBJECTS:
            case = entry["subjects"].get(subject)
            if not measured(case):
                continue
            assert case is not None
            total, wan = case["total"], case["wan"]
            rows.append(
                {
                    "scenario": name,
                    "load": name.split("-")[1],
                    "rtt_ms": wan["rtt_ms"],
                    "wan_loss_pct": wan["loss_pct"],
                    "subject": subject,
                    "connections": case.get("connections", 1),
                    "seconds": case["seconds"],
                    "sent": total["sent"],
                    "loss_pct": total["loss_pct"],
                    **{k: total[k] for k in ("p50_ms", "p99_ms", "max_ms")},
                    **{f"added_p{q}_ms": total[f"added_p{q}_ms"] for q in (50, 90, 95, 98, 99)},
                    "dropped": total["dropped_by_tunnel"] + total["dropped_by_kernel"],
                    "unaccounted": total["unaccounted"],
                }
            )
    return rows


def wan_text(rows: list[dict[str, Any]]) -> str:
    """The WAN table: per load, RTT and loss, each subject's loss, p50, p99 and added p99."""
    cell = f"{'loss%':>6}{'p50':>7}{'p99':>7}{'+p99':>7}"
    lines = [
        "",
        "WAN scenarios (issue 13): one-way latency in ms; +p99 is over the configured one-way",
        "delay (RTT/2); loss% is of the datagrams sent; the WAN loss is each way, per packet.",
        f"{'load':9}{'RTT':>4}{'loss':>5} |" + "|".join(f" {s:<26}" for s in WAN_SUBJECTS),
        f"{'':18} |" + "|".join(f" {cell}" for _ in WAN_SUBJECTS),
    ]
    keys: dict[tuple[str, float, float], dict[str, dict[str, Any]]] = {}
    for r in rows:
        keys.setdefault((r["load"], r["rtt_ms"], r["wan_loss_pct"]), {})[r["subject"]] = r
    for (load, rtt, loss), by_subject in keys.items():
        cells = []
        for subject in WAN_SUBJECTS:
            r = by_subject.get(subject)
            if r is None:
                cells.append(f" {'-':>26}")
                continue
            cells.append(
                f" {r['loss_pct']:>6.2f}{fmt_ms(r['p50_ms']):>7}{fmt_ms(r['p99_ms']):>7}"
                f"{fmt_ms(r['added_p99_ms']):>7}"
            )
        lines.append(f"{load:9}{rtt:>4g}{loss:>5g} |" + "|".join(cells))
    return "\n".join(lines)


# Issue 13's "Done when", at 20 ms RTT and 1% loss each way: p99 added latency (over RTT/2)
# within 2x the RTT at 1,000/s, within 1.5x the RTT at 50/s each way; and whatever did not
# arrive was counted as dropped.
WAN_TARGETS = (
    ("wan-paced200-rtt20-loss1", "1,000/s of 200 B", 40.0),
    ("wan-rtp50-rtt20-loss1", "50/s each way", 30.0),
)


def wan_targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """Each target of issue 13, for ours with and without --connections."""
    out = []
    for scenario, what, bound in WAN_TARGETS:
        for subject in ("ours", RESILIENT):
            name = f"{subject}, {what}, 20 ms RTT, 1% loss: +p99 <= {bound:g} ms, all counted"
            entry = results["scenarios"].get(scenario, {})
            case = entry.get("subjects", {}).get(subject)
            if not measured(case):
                out.append(target(name, "SKIP", f"{scenario} not run for {subject}"))
                continue
            assert case is not None
            total = case["total"]
            added = total["added_p99_ms"]
            ok = added is not None and added <= bound and total["unaccounted"] <= 0
            figure = (
                f"+p99 {fmt_ms(added)} ms, {total['loss_pct']:.2f}% lost "
                f"({total['unaccounted']} unaccounted) over {case['seconds']:g} s"
            )
            out.append(target(name, verdict(ok), figure))
    return out


# --- targets ----------------------------------------------------------------------------------


def target(name: str, status: str, figure: str) -> dict[str, str]:
    return {"target": name, "status": status, "figure": figure}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def ours(results: dict[str, Any], scenario: str) -> Case | None:
    case = results["scenarios"].get(scenario, {}).get("subjects", {}).get("ours")
    return case if measured(case) else None


def targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """Each "Done when" item of issue 3, with our figure and PASS, FAIL or SKIP (not run)."""
    out = []
    for size, factor in ((200, 5), (1400, 3)):
        name = f"closed-loop capacity {size} B: >= {factor}x original, zero loss"
        case = ours(results, f"capacity-{size}")
        original = rate(results, f"capacity-{size}", "original")
        if not case or not original:
            out.append(target(name, "SKIP", "needs ours and original"))
            continue
        mine = case["total"]["delivered_per_s"]
        lost = sum(r["lost"] for r in case.get("rounds", [case["total"]]))  # in any round
        kernel = rate(results, f"capacity-{size}", "kernel")
        of_kernel = f", {100 * mine / kernel:.0f}% of kernel" if kernel else ""
        out.append(
            target(
                name,
                verdict(mine >= factor * original and lost == 0),
                f"{mine:,.0f}/s = {mine / original:.1f}x {original:,.0f}/s, {lost} lost"
                + of_kernel,
            )
        )
    name = "steady 1,000/s of 1200 B for 60 s: zero loss, p99 < 1 ms"
    case = ours(results, "steady-60")
    if case:
        total = case["total"]
        out.append(
            target(
                name,
                verdict(total["lost"] == 0 and (total["p99_ms"] or 1e9) < 1),
                f"{total['lost']} lost, p99 {fmt_ms(total['p99_ms'])} ms "
                f"over {case['seconds']:g} s",
            )
        )
    else:
        out.append(target(name, "SKIP", "steady-60 not run"))
    for size in (64, 1400):
        name = f"unpaced overload {size} B: p99 < 20 ms at >= 80% of capacity"
        case, capacity = (
            ours(results, f"overload-{size}"),
            rate(results, CAPACITY_FOR[size], "ours"),
        )
        if not case or not capacity:
            out.append(target(name, "SKIP", f"needs overload-{size} and {CAPACITY_FOR[size]}"))
            continue
        total = case["total"]
        share = total["delivered_per_s"] / capacity
        out.append(
            target(
                name,
                verdict((total["p99_ms"] or 1e9) < 20 and share >= 0.8),
                f"p99 {fmt_ms(total['p99_ms'])} ms, {total['delivered_per_s']:,.0f}/s = "
                f"{100 * share:.0f}% of {capacity:,.0f}/s",
            )
        )
    name = "flood both ways: each direction >= 40% of the total"
    case = ours(results, "flood-both")
    if case:
        got = shares(case)
        out.append(target(name, verdict(min(got.values()) >= 40), shares_text(case)))
    else:
        out.append(target(name, "SKIP", "flood-both not run"))
    for scenario, what in (("burst", "500-datagram burst"), ("freeze", "0.2 s freeze")):
        name = f"after the {what}: steady p99 < 2 ms within 1 s, all not dropped arrive"
        case = ours(results, scenario)
        if not case:
            out.append(target(name, "SKIP", f"{scenario} not run"))
            continue
        out.append(target(name, verdict(recovered(worst_recovery(case))), recovery_text(case)))
    name = "peak RSS of each tunnel process < 60 MB throughout"
    peaks = {"server": 0, "client": 0}
    cases = [entry["subjects"].get("ours") for entry in results["scenarios"].values()]
    cases += [point.get("ours") for point in results["sweep"].values()]
    for case in filter(measured, cases):
        for role in peaks:
            peaks[role] = max(peaks[role], case["tunnel"][role].get("VmHWM", 0))
    if any(peaks.values()):
        figure = ", ".join(f"{role} {kb * 1024 / MB:.1f} MB" for role, kb in peaks.items())
        soak = ours(results, "soak-60")
        if soak and "rss_kb" in soak:
            growth = {r: (s[-1] - s[0]) / 1024 for r, s in soak["rss_kb"].items() if s}
            figure += "; soak growth " + ", ".join(f"{r} {g:+.1f} MiB" for r, g in growth.items())
        ok = all(kb * 1024 < 60 * MB for kb in peaks.values())
        out.append(target(name, verdict(ok), figure))
    else:
        out.append(target(name, "SKIP", "ours not run"))
    out.append(target("unit tests of the batching code paths", "n/a", "make test, not timed"))
    return out


def targets_text(items: list[dict[str, str]], title: str = "issue 3 (Done when), ours") -> str:
    lines = ["", f"Targets of {title}:"]
    for item in items:
        lines.append(f"  {item['status']:4}  {item['target']}")
        lines.append(f"        {item['figure']}")
    return "\n".join(lines)


# --- plot -------------------------------------------------------------------------------------

COLOURS = {"kernel": "tab:gray", "original": "tab:red", "ours": "tab:blue"}


def plot(results: dict[str, Any], path: Path) -> str:
    """Latency (p50, p99) and delivered rate against offered load, from the sweep."""
    if not results["sweep"]:
        return "none (no sweep)"
    try:
        import matplotlib  # the bench extra: `make bench` installs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "none (matplotlib missing: pip install '.[bench]')"
    fig, (lat_ax, rate_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for subject in SUBJECT_ORDER:
        points = [
            p[subject]["total"] for p in results["sweep"].values() if measured(p.get(subject))
        ]
        if not points:
            continue
        offered = [t["offered_per_s"] for t in points]
        colour = COLOURS[subject]
        lat_ax.plot(
            offered, [t["p99_ms"] for t in points], "o-", color=colour, label=f"{subject} p99"
        )
        lat_ax.plot(
            offered,
            [t["p50_ms"] for t in points],
            "s--",
            color=colour,
            alpha=0.6,
            label=f"{subject} p50",
        )
        rate_ax.plot(
            offered, [t["delivered_per_s"] for t in points], "o-", color=colour, label=subject
        )
    lat_ax.set(
        xscale="log",
        yscale="log",
        xlabel="offered load (datagrams/s, 200 B)",
        ylabel="one-way latency (ms)",
        title="Latency against offered load",
    )
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.legend(fontsize="small")
    offered = [
        c["total"]["offered_per_s"]
        for p in results["sweep"].values()
        for c in p.values()
        if measured(c)
    ]
    top = max(offered, default=1)
    rate_ax.plot([0, top], [0, top], ":", color="black", alpha=0.4, label="all delivered")
    rate_ax.set(
        xlabel="offered load (datagrams/s, 200 B)",
        ylabel="delivered (datagrams/s)",
        title="Delivered against offered",
    )
    rate_ax.grid(True, alpha=0.3)
    rate_ax.legend(fontsize="small")
    info = results["machine"]
    fig.suptitle(
        f"udptunnel: {info['nproc']} CPUs, {info['cpu_model']}, repository {info['repository']}",
        fontsize="small",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
