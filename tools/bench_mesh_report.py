"""Choosing the best layout and writing `meshserve bench-mesh` results: the stdout table,
results.json, results.csv, TensorBoard scalars and a goodput plot."""

from __future__ import annotations

import csv
import json
import math
import os

from meshserve.meshes import MeshLayout, parse_layout
from meshserve.tools.bench_mesh_hlo import KINDS

# The keys every per-layout object of results.json has (others are extra detail).
REQUIRED_KEYS: tuple[str, ...] = (
    "layout", "fits", "reason", "weights_bytes_per_device", "kv_bytes_per_device",
    "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "output_tokens_per_s",
    "goodput_rps", "collectives_per_step", "collective_bytes_per_step",
)
_SLO_FIELDS = {"ttft_ms": "ttft_ms_p99", "tpot_ms": "tpot_ms_p99", "e2e_ms": "e2e_ms_p99"}


def measured(row: dict) -> bool:
    return bool(row.get("fits")) and row.get("error") is None and row.get("completed") is not None


def slo_violations(row: dict, slo: dict[str, float], num_requests: int) -> list[str]:
    """Why a measured layout misses the SLO: a failed request, or a p99 over its target."""
    out = []
    if row["completed"] < num_requests:
        out.append(f"{num_requests - row['completed']} of {num_requests} requests failed")
    for key, target in slo.items():
        value = row.get(_SLO_FIELDS[key])
        if value is None or not value <= target:  # NaN (no data) is a miss too
            out.append(f"p99 {key} {_num(value)} > {target:g}")
    return out


def choose_best(rows: list[dict], slo: dict[str, float],
                num_requests: int) -> tuple[str | None, str]:
    """The layout with the most goodput among those meeting the SLO (p99 TTFT/TPOT/E2E
    within target, no failed request); ties go to output tokens/s. Without an SLO, the
    most output tokens/s. Sets each row's `meets_slo`; returns (layout or None, why)."""
    for row in rows:
        row["meets_slo"] = measured(row) and not slo_violations(row, slo, num_requests)
    good = [r for r in rows if r["meets_slo"]]
    if not good:
        run = [r for r in rows if measured(r)]
        if not run:
            return None, "no layout was measured: every layout was refused or failed"
        run.sort(key=lambda r: (-(r["goodput_rps"] or 0.0), -r["output_tokens_per_s"]))
        return None, (
            f"no layout meets the SLO {slo}; the most goodput came from "
            + "; ".join(f"{r['layout']}: {', '.join(slo_violations(r, slo, num_requests))}"
                        for r in run[:3])
        )
    rank = "goodput_rps" if slo else "output_tokens_per_s"
    best = max(good, key=lambda r: (r[rank] or 0.0, r["output_tokens_per_s"]))
    what = f"goodput {best['goodput_rps']:.2f} req/s under {slo}" if slo else (
        f"{best['output_tokens_per_s']:.1f} output tokens/s (no --slo given)")
    return best["layout"], f"best layout {best['layout']}: {what}"


def short_layout(text: str) -> str:
    """`slices=2,data=1,tensor=4,...` without the axes that are 1 (for narrow columns)."""
    layout = parse_layout(text)
    terms = [t for t in layout.to_string(with_slices=True).split(",") if not t.endswith("=1")]
    return ",".join(terms) or "1 device"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(results: dict) -> str:
    """A markdown table of the measured layouts, then the refused ones with reasons."""
    head = ("layout", "weights MiB/dev", "KV MiB/dev", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
            "out tok/s", "goodput req/s", "AR/AG/RS/A2A/CP per step", "coll. KiB/step", "SLO")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in results["layouts"]:
        if not measured(r):
            why = r.get("error") or r.get("reason") or "not run"
            notes.append(f"  {r['layout']}: {'refused' if not r['fits'] else 'failed'}: {why}")
            continue
        counts = "/".join(str(r["collectives_per_step"][k]) for k in KINDS)
        kib = sum(r["collective_bytes_per_step"].values()) / 1024
        mark = "best" if r["layout"] == results["best"] else ("ok" if r["meets_slo"] else "miss")
        lines.append(
            f"| {short_layout(r['layout'])} | {_mib(r['weights_bytes_per_device'])} | "
            f"{_mib(r['kv_bytes_per_device'])} | {_num(r['ttft_ms_p50'])} / "
            f"{_num(r['ttft_ms_p99'])} | {_num(r['tpot_ms_p50'])} / {_num(r['tpot_ms_p99'])} | "
            f"{_num(r['output_tokens_per_s'])} | {_num(r['goodput_rps'], 2)} | {counts} | "
            f"{kib:.1f} | {mark} |")
    moe = [r for r in results["layouts"] if measured(r) and "expert_tokens" in r]
    if moe:  # routing balance and what expert parallelism splits, per MoE layout
        lines += ["", "| layout | expert weights MiB/dev | hotspot ratio (worst layer) | "
                  "dropped tokens |", "|---|---|---|---|"]
        lines += [f"| {short_layout(r['layout'])} | "
                  f"{_mib(r.get('expert_weights_bytes_per_device'))} | "
                  f"{_num(r['expert_hotspot_ratio'], 2)} | {r['moe_dropped_tokens']} |"
                  for r in moe]
    context = [r for r in results["layouts"] if measured(r) and "prefill_chunk_tokens" in r
               and (parse_layout(r["layout"]).sequence > 1 or r.get("long_prompt_ttft_ms"))]
    if context:  # what splitting long sequences over `sequence` costs and saves
        long = results.get("workload", {}).get("long_prompt_len") or "-"
        lines += ["", "| layout | KV MiB/dev | coll. per decode step | KiB per decode step | "
                  "coll. per prefill chunk | B per prefill token | "
                  f"TTFT ms, {long}-token prompt |", "|" + "---|" * 7]
        lines += [f"| {short_layout(r['layout'])} | {_mib(r['kv_bytes_per_device'])} | "
                  f"{sum(r['collectives_per_step'].values())} | "
                  f"{sum(r['collective_bytes_per_step'].values()) / 1024:.1f} | "
                  f"{sum(r['collectives_per_prefill_chunk'].values())} | "
                  f"{sum(r['collective_bytes_per_prefill_token'].values()):.0f} | "
                  f"{_num(r.get('long_prompt_ttft_ms'))} |" for r in context]
    if notes:
        lines += ["", f"not measured ({len(notes)}):", *notes]
    lines += ["", results["best_message"]]
    return "\n".join(lines)


def _csv_row(r: dict) -> dict:
    counts, nbytes = r.get("collectives_per_step"), r.get("collective_bytes_per_step")
    row = {k: r.get(k) for k in REQUIRED_KEYS}
    row["collectives_per_step"] = None if counts is None else sum(counts.values())
    row["collective_bytes_per_step"] = None if nbytes is None else sum(nbytes.values())
    for k in KINDS:
        row[f"{k.replace('-', '_')}_per_step"] = None if counts is None else counts[k]
    row["meets_slo"] = r.get("meets_slo")
    row["error"] = r.get("error")
    return row


def write_tensorboard(results: dict, logdir: str) -> None:
    """Scalars per metric with the layout index as the step (the description maps
    indices to layouts), plus one series per layout, with tensorboard's own writer."""
    from tensorboard.summary import Writer

    run = [r for r in results["layouts"] if measured(r)]
    legend = "step = layout: " + "; ".join(f"{i}={r['layout']}" for i, r in enumerate(run))
    metrics = ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99",
               "output_tokens_per_s", "goodput_rps")
    writer = Writer(logdir)
    try:
        for i, r in enumerate(run):
            values = {m: r[m] for m in metrics if r[m] is not None}
            values["collectives_per_step"] = sum(r["collectives_per_step"].values())
            values["collective_bytes_per_step"] = sum(r["collective_bytes_per_step"].values())
            values["meets_slo"] = float(r["meets_slo"])
            for name, value in values.items():
                writer.add_scalar(f"bench_mesh/{name}", value, i, description=legend)
                writer.add_scalar(f"layout/{r['layout']}/{name}", value, 0)
        writer.flush()
    finally:
        writer.close()


def write_plot(results: dict, path: str) -> str | None:
    """Goodput (or output tokens/s without an SLO) per measured layout; layouts that miss
    the SLO are hatched red. Returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'meshserve[test]'): no plot written"
    run = [r for r in results["layouts"] if measured(r)]
    if not run:
        return "no layout was measured: no plot written"
    key = "goodput_rps" if results["slo"] else "output_tokens_per_s"
    values = [r[key] or 0.0 for r in run]
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.45 * len(run) + 2)), 5.0))
    bars = ax.bar(range(len(run)), values,
                  color=["tab:green" if r["meets_slo"] else "tab:red" for r in run])
    for bar, r in zip(bars, run, strict=True):
        if not r["meets_slo"]:
            bar.set_hatch("//")
            if not bar.get_height():  # zero goodput: mark it, an empty slot reads as missing
                ax.plot(bar.get_x() + bar.get_width() / 2, 0, "x", color="tab:red")
        if r["layout"] == results["best"]:
            bar.set_edgecolor("black")
            bar.set_linewidth(2)
            ax.annotate("best", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom")
    ax.set_xticks(range(len(run)), [short_layout(r["layout"]) for r in run], rotation=45,
                  ha="right", fontsize=8)
    ax.set_ylabel("goodput (req/s)" if results["slo"] else "output tokens/s")
    ax.margins(y=0.12)  # room for the "best" label
    slo = ", ".join(f"p99 {k} <= {v:g}" for k, v in results["slo"].items()) or "none"
    refused = len(results["layouts"]) - len(run)
    ax.set_title(f"{results['model']['name']} on {results['devices']} {results['platform']} "
                 f"devices: {len(run)} layouts measured, {refused} not\n"
                 f"SLO: {slo} (green meets it, hatched red misses it)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(results: dict, out_dir: str) -> list[str]:
    """results.json, results.csv, tensorboard/ and goodput.png in `out_dir`; returns
    messages for what could not be written."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    rows = [_csv_row(r) for r in results["layouts"]]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(REQUIRED_KEYS))
        writer.writeheader()
        writer.writerows(rows)
    write_tensorboard(results, os.path.join(out_dir, "tensorboard"))
    problem = write_plot(results, os.path.join(out_dir, "goodput.png"))
    return [problem] if problem else []


def best_layout_from(path: str) -> MeshLayout:
    """The `best` layout of a bench-mesh results.json (what `serve --layout-from` uses)."""
    with open(path) as f:
        results = json.load(f)
    if "best" not in results:
        raise ValueError(f"{path} has no 'best' key: is it a `meshserve bench-mesh` results.json?")
    if results["best"] is None:
        raise ValueError(f"{path} names no best layout: {results.get('best_message', '')}")
    return parse_layout(results["best"])


def apply_layout_from(f) -> None:
    """`meshserve serve --layout-from results.json`: set --slices and --mesh (on the absl
    FlagValues `f`) from the file's best layout; refuses to mix with --mesh/--slices."""
    if not f.layout_from:
        return
    if f["mesh"].present or f["slices"].present:
        raise ValueError("give --layout-from or --mesh/--slices, not both")
    best = best_layout_from(f.layout_from)
    f.mesh, f.slices = best.to_string(), best.slices
