"""Eval reports: a markdown table and a PNG of accuracy and cost per system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluribus.io import atomic_write_bytes, atomic_write_text


def markdown(payload: dict[str, Any]) -> str:
    """The report.md text: one row per system, same held-out problems for all."""
    lines = [
        f"# Eval of run `{payload['run']}`",
        "",
        f"{payload['problems']} held-out problems of `{payload['task']}`; every system saw the same ones.",
        "",
        "| system | accuracy | first-answer accuracy | wrong first answers corrected | unparsable "
        "| tokens / problem | seconds / problem |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in payload["systems"].items():
        lines.append(
            f"| {name} | {r['accuracy']:.1%} | {r['first_answer_accuracy']:.1%} | {r['wrong_first_corrected']:.1%} "
            f"| {r['unparsable']:.1%} | {r['tokens_per_problem']:.0f} | {r['seconds_per_problem']:.2f} |"
        )
    lines += ["", "![accuracy and cost](accuracy.png)", ""]
    return "\n".join(lines)


def plot(payload: dict[str, Any]) -> bytes:
    """A PNG with accuracy (left) and tokens per problem (right) per system."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["systems"])
    acc = [payload["systems"][n]["accuracy"] * 100 for n in names]
    tok = [payload["systems"][n]["tokens_per_problem"] for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = a.bar(names, acc, color="#4C72B0")
    a.bar_label(bars, fmt="%.1f%%")
    a.set_ylabel("accuracy (%)")
    a.set_ylim(0, max(100, max(acc) * 1.15))
    a.set_title(f"accuracy on {payload['problems']} held-out problems")
    bars = b.bar(names, tok, color="#DD8452")
    b.bar_label(bars, fmt="%.0f")
    b.set_ylabel("tokens / problem")
    b.set_title("cost")
    for ax in (a, b):
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
