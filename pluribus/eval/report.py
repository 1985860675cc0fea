"""Eval reports: markdown tables and a PNG of accuracy (with 95% intervals), cost and robustness per system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluribus.io import atomic_write_bytes, atomic_write_text


def _system_table(task: dict[str, Any]) -> list[str]:
    lines = [
        "| system | problems | accuracy | 95% interval | first-answer accuracy | wrong first answers corrected "
        "| unparsable | tokens / problem | seconds / problem |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in task["systems"].items():
        lines.append(
            f"| {name} | {r['problems']} | {r['accuracy']:.1%} | {r['accuracy_low']:.1%} - {r['accuracy_high']:.1%} "
            f"| {r['first_answer_accuracy']:.1%} | {r['wrong_first_corrected']:.1%} "
            f"| {r['unparsable']:.1%} | {r['tokens_per_problem']:.0f} | {r['seconds_per_problem']:.2f} |"
        )
    return lines


def _share(k: int, n: int) -> str:
    return f"{k} of {n} ({k / n:.0%})" if n else "0 of 0"


def _verifier_lines(name: str, bon: dict[str, Any]) -> list[str]:
    """prm-bon against sc (team-prm against the team) on the same solutions, and the PRM's own quality as its
    training record gives it."""
    agree, vote = bon["vs_vote"], bon["vote"]
    among = "the very samples sc voted over" if vote == "sc" else "the team's own last round (its transcripts)"
    lines = [f"{name}: on each problem, {among}, and the answer of the solution the PRM `{bon['verifier']}` "
             f"scores highest (its step scores aggregated by {bon['verifier_aggregate']}) instead of {vote}'s majority; "
             f"the same tokens as {vote} (the PRM's reading costs no generation). Prompt and step rule: "
             f"{bon['verifier_prompt']}. On {agree['problems']} problems: where the majority vote is wrong, the PRM's "
             f"choice is right on {_share(agree['verifier_right_when_vote_wrong'], agree['vote_wrong'])}; where "
             f"the PRM's choice is wrong, the majority is right on "
             f"{_share(agree['vote_right_when_verifier_wrong'], agree['verifier_wrong'])} (exact McNemar p = "
             f"{agree['p_value']:.3g}); some sample was right on {_share(agree['any_sample_right'], agree['problems'])}"
             " (the best any chooser could do)."]
    return lines


def _quality_lines(bon: dict[str, Any]) -> list[str]:
    """The PRM's own step-level quality, as its training record gives it (or that it was not measured)."""
    q = bon.get("verifier_quality")
    if not q:
        return [f"The step-level quality of the PRM `{bon['verifier']}`: not measured (its training record holds no "
                "prm_metrics and no held-out step metrics)."]
    shown = ", ".join(f"{name.replace('_', ' ')} {q[key]:.3f}" if isinstance(q[key], float) else
                      f"{name.replace('_', ' ')} {q[key]}"
                      for key, name in (("auroc", "step AUROC"), ("f1", "step F1"), ("accuracy", "step accuracy"),
                                        ("first_error_accuracy", "first-error accuracy"), ("n_steps", "steps"),
                                        ("n_rows", "rows")) if q.get(key) is not None)
    return [f"The step-level quality of the PRM `{bon['verifier']}` on held-out labelled steps ({q['source']}, from "
            f"its training record): {shown or 'not measured'}."]


def _seat_lines(seats: list[dict[str, Any]]) -> list[str]:
    """Each seat of the team, its first round against its last: does seeing its peers help it?"""
    lines = ["Each seat of the team, round 0 (alone) against its last round (after its peers), on the team's problems:",
             "", "| seat | problems | round-0 accuracy | last-round accuracy | right -> wrong | wrong -> right |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in seats:
        lines.append(f"| {s['seat']} | {s['problems']} | {s['round0_accuracy']:.1%} | {s['final_accuracy']:.1%} "
                     f"| {s['right_to_wrong']} | {s['wrong_to_right']} |")
    return lines


def _task_section(task: dict[str, Any], heading: str) -> list[str]:
    lines = [f"## {heading}", "",
             f"{task['problems']} problems of `{task['task']}` (split: {task['split']}); every single-agent system saw "
             "the same ones" + (f"; the team and sc ran on the first {task['team_problems']} of them."
                                if task.get("team_problems") and task["team_problems"] < task["problems"] else "."),
             "", *_system_table(task)]
    for name, a in (task.get("adapters") or {}).items():
        lines += ["", f"{name} uses adapter `{a['path']}` (sha256 {a['fingerprint']})."]
    sc = task["systems"].get("sc")
    if sc:
        lines += ["", f"sc: {sc['samples_drawn']} samples drawn per problem, {sc['mean_samples_used']:.1f} used on "
                  f"average to spend the team's tokens on that problem (reached on {sc['budget_reached']:.0%} of "
                  "problems), then a majority vote."]
    shown: set[str] = set()
    for name in ("prm-bon", "team-prm"):
        if task["systems"].get(name):
            lines += ["", *_verifier_lines(name, task["systems"][name])]
    for name in ("prm-bon", "team-prm"):
        bon = task["systems"].get(name)
        if bon and bon["verifier"] not in shown:  # once per PRM
            shown.add(bon["verifier"])
            lines += ["", *_quality_lines(bon)]
    if task.get("comparisons"):
        lines += ["", "Against the single base agent, problem by problem (two-sided exact McNemar test):", "",
                  "| system | baseline | problems | solved only by the system | solved only by the baseline | p |",
                  "|---|---|---:|---:|---:|---:|"]
        for c in task["comparisons"]:
            lines.append(f"| {c['system']} | {c['baseline']} | {c['problems']} | {c['wins']} | {c['losses']} "
                         f"| {c['p_value']:.3g} |")
    gain = task.get("team_gain")
    if gain:
        lines += ["", f"On the team's {gain['problems']} problems the single agent scores {gain['single_accuracy']:.1%} "
                  f"and the team {gain['team_accuracy']:.1%} ({gain['team_gain']:+.1%}) at "
                  f"{gain['team_tokens_per_problem']:.0f} tokens per problem. Each system's share of that gain, and "
                  "its tokens as a fraction of the team's:", "",
                  "| system | problems | accuracy there | gain over single | share of the team's gain | tokens vs team |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, g in gain["systems"].items():
            share = f"{g['share_of_team_gain']:.0%}" if g["share_of_team_gain"] is not None else "n/a (no team gain)"
            frac = f"{g['token_fraction_of_team']:.0%}" if g["token_fraction_of_team"] is not None else "n/a"
            lines.append(f"| {name} | {g['problems']} | {g['accuracy_on_team_problems']:.1%} | "
                         f"{g['gain_over_single']:+.1%} | {share} | {frac} |")
    if task.get("seats"):
        lines += ["", *_seat_lines(task["seats"])]
    stop = task.get("early_stop")
    if stop and stop["observed"]:
        lines += ["", f"Early stopping (team.early_stop: a problem stops debating once every agent gives the same "
                  f"answer): {stop['stopped_early']} of {stop['problems']} team problems stopped before the last "
                  f"round; accuracy {stop['accuracy_early_stop']:.1%} at {stop['tokens_early_stop']:.0f} tokens per "
                  "problem (the full debate did not run, so its accuracy is not known here)."]
    elif stop:
        lines += ["", f"Early stopping (a problem stops debating once every agent gives the same answer), computed "
                  f"from the full debate: on {stop['problems']} team problems, {stop['stopped_early']} would stop "
                  f"before the last round; accuracy {stop['accuracy_full']:.1%} -> {stop['accuracy_early_stop']:.1%}, "
                  f"tokens per problem {stop['tokens_full']:.0f} -> {stop['tokens_early_stop']:.0f} "
                  f"({stop['tokens_saved']:.0%} saved). `team.early_stop: true` makes the debate stop so."]
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """The report.md text: a table per task (same problems for every system), comparisons, gain, robustness."""
    tasks = payload.get("tasks") or [{**payload, "name": "heldout", "team_problems": 0}]
    lines = [f"# Eval of run `{payload['run']}`", "", "![accuracy against tokens](accuracy.png)", ""]
    for i, task in enumerate(tasks):
        heading = f"Held-out problems of the training task: `{task['task']}`" if i == 0 else \
            f"Transfer: `{task['name']}` ({task['task']})"
        lines += [*_task_section(task, heading), ""]
    if payload.get("robustness"):
        lines += ["## Robustness", "", "The same problems perturbed, gold answers unchanged (lost: right before, wrong "
                  "after; p: exact McNemar of lost vs gained):", "",
                  "| system | perturbation | accuracy | 95% interval | change vs clean | lost | gained | p |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, kinds in payload["robustness"].items():
            for kind, r in kinds.items():
                lines.append(f"| {name} | {kind} | {r['accuracy']:.1%} | {r['accuracy_low']:.1%} - "
                             f"{r['accuracy_high']:.1%} | {r['change']:+.1%} | {r['lost']} | {r['gained']} "
                             f"| {r['p_value']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict[str, Any]) -> bytes:
    """A PNG with one panel per task: accuracy (95% interval) against tokens per problem, one point per system."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = payload.get("tasks") or [{**payload, "name": "heldout"}]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.4), squeeze=False)
    colors = {"single": "#4C72B0", "sc": "#8172B2", "prm-bon": "#937860", "team": "#C44E52", "team-prm": "#8C8C8C", "expert": "#55A868", "merged": "#DD8452",
              "distilled": "#55A868"}
    for ax, task in zip(axes[0], tasks, strict=True):
        for name, r in task["systems"].items():
            x, y = r["tokens_per_problem"], r["accuracy"] * 100
            err = [[y - r["accuracy_low"] * 100], [r["accuracy_high"] * 100 - y]]
            ax.errorbar([x], [y], yerr=err, fmt="o", capsize=4, color=colors.get(r["system"], "#333333"),
                        markerfacecolor="white" if r["mode"] == "sampled" else None)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("tokens per problem (log)")
        ax.set_ylabel("accuracy (%), 95% interval")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.set_title(f"{task['name']}: {task['problems']} problems of {task['task']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(payload: dict[str, Any], out_dir: Path) -> Path:
    """Write report.md and accuracy.png into ``out_dir``; returns the report path."""
    atomic_write_bytes(out_dir / "accuracy.png", plot(payload))
    return atomic_write_text(out_dir / "report.md", markdown(payload))
