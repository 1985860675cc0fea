"""Eval reports: markdown tables and a PNG of accuracy (with 95% intervals), cost and robustness per system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluribus.io import atomic_write_bytes, atomic_write_text


def markdown(payload: dict[str, Any]) -> str:
    """The report.md text: one row per system, same held-out problems for all; comparisons; robustness."""
    lines = [
        f"# Eval of run `{payload['run']}`",
        "",
        f"{payload['problems']} held-out problems of `{payload['task']}`; every system saw the same ones.",
        "",
        *([f"The distilled system uses adapter `{payload['adapter']['path']}` (sha256 "
             f"{payload['adapter']['fingerprint']}).", ""] if payload.get("adapter") else []),
        "| system | accuracy | 95% interval | first-answer accuracy | wrong first answers corrected | unparsable "
        "| tokens / problem | seconds / problem |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in payload["systems"].items():
        lines.append(
            f"| {name} | {r['accuracy']:.1%} | {r['accuracy_low']:.1%} - {r['accuracy_high']:.1%} "
            f"| {r['first_answer_accuracy']:.1%} | {r['wrong_first_corrected']:.1%} "
            f"| {r['unparsable']:.1%} | {r['tokens_per_problem']:.0f} | {r['seconds_per_problem']:.2f} |"
        )
    if payload.get("comparisons"):
        lines += ["", "Against the single base agent, problem by problem (two-sided exact McNemar test):", "",
                  "| system | baseline | solved only by the system | solved only by the baseline | p |",
                  "|---|---|---:|---:|---:|"]
        for c in payload["comparisons"]:
            lines.append(f"| {c['system']} | {c['baseline']} | {c['wins']} | {c['losses']} | {c['p_value']:.3g} |")
    if payload.get("robustness"):
        lines += ["", "Robustness: the same problems perturbed, gold answers unchanged (lost: right before, wrong "
                  "after; p: exact McNemar of lost vs gained):", "",
                  "| system | perturbation | accuracy | 95% interval | change vs clean | lost | gained | p |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, kinds in payload["robustness"].items():
            for kind, r in kinds.items():
                lines.append(f"| {name} | {kind} | {r['accuracy']:.1%} | {r['accuracy_low']:.1%} - "
                             f"{r['accuracy_high']:.1%} | {r['change']:+.1%} | {r['lost']} | {r['gained']} "
                             f"| {r['p_value']:.3g} |")
    lines += ["", "![accuracy and cost](accuracy.png)", ""]
    return "\n".join(lines)


def plot(payload: dict[str, Any]) -> bytes:
    """A PNG with accuracy (left) and tokens per problem (right) per system."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["systems"])
    systems = payload["systems"]
    acc = [systems[n]["accuracy"] * 100 for n in names]
    err = [[(systems[n]["accuracy"] - systems[n]["accuracy_low"]) * 100 for n in names],
           [(systems[n]["accuracy_high"] - systems[n]["accuracy"]) * 100 for n in names]]
    tok = [systems[n]["tokens_per_problem"] for n in names]
    robust = payload.get("robustness") or {}
    fig, axes = plt.subplots(1, 3 if robust else 2, figsize=(13.5 if robust else 9, 3.6))
    a, b = axes[0], axes[1]
    bars = a.bar(names, acc, color="#4C72B0", yerr=err, capsize=4, error_kw={"elinewidth": 1})
    a.bar_label(bars, fmt="%.1f%%", label_type="center", color="white")
    a.set_ylabel("accuracy (%), 95% interval")
    a.set_ylim(0, 105)
    a.set_title(f"accuracy on {payload['problems']} held-out problems")
    bars = b.bar(names, tok, color="#DD8452")
    b.bar_label(bars, fmt="%.0f")
    b.set_ylabel("tokens / problem")
    b.set_ylim(0, max(tok + [1.0]) * 1.15)
    b.set_title("cost")
    if robust:
        c = axes[2]
        kinds = sorted({k for v in robust.values() for k in v})
        width = 0.8 / (len(kinds) + 1)
        xs = range(len(names))
        c.bar([x - 0.4 + width / 2 for x in xs], acc, width, label="clean", color="#4C72B0")
        for j, kind in enumerate(kinds, 1):
            vals = [robust.get(n, {}).get(kind, {}).get("accuracy", 0.0) * 100 for n in names]
            c.bar([x - 0.4 + width / 2 + j * width for x in xs], vals, width, label=kind,
                  color=("#55A868", "#C44E52", "#8172B2")[(j - 1) % 3])
        c.set_xticks(list(xs), names)
        c.set_ylabel("accuracy (%)")
        c.set_ylim(0, 105)
        c.set_title("robustness")
        c.legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(payload: dict[str, Any], out_dir: Path) -> Path:
    """Write report.md and accuracy.png into ``out_dir``; returns the report path."""
    atomic_write_bytes(out_dir / "accuracy.png", plot(payload))
    return atomic_write_text(out_dir / "report.md", markdown(payload))
