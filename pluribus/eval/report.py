"""Eval reports: markdown tables and a PNG of accuracy (with 95% intervals), cost and robustness per system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluribus.io import atomic_write_bytes, atomic_write_text

# a table of paired comparisons (the team's, the students'): one system against another on shared problems
_VERSUS_HEAD = ["| system | against | problems | accuracy | theirs | difference | solved only by the system "
                "| solved only by the other | p |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]


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
    from pluribus.eval.generations import family

    agree, vote = bon["vs_vote"], bon["vote"]
    among = (f"the very samples {vote} voted over" if family(vote) in ("sc", "member-sc") else
             "the team's own last round (its transcripts)")
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
    """One task's section: what was asked, the table, the notes, the verifier, the comparisons, the team's gain,
    the seats and early stopping."""
    lines = [f"## {heading}", "", _asked_line(task), "", *_system_table(task)]
    lines += _system_notes(task) + _verifier_section(task) + _comparison_lines(task) + _team_versus_lines(task)
    lines += _gain_lines(task)
    if task.get("debate_rounds"):
        for label, debate in task["debate_rounds"].items():
            lines += _debate_lines(label, debate)
        return lines
    if task.get("seats"):  # a results.json written before debate_rounds: the first generation's team only
        lines += ["", *_seat_lines(task["seats"])]
    return lines + _early_stop_lines(task.get("early_stop"))


def _debate_lines(label: str, debate: dict[str, Any]) -> list[str]:
    """One team, round by round: the vote after each round (what stopping there would have given), its seats,
    early stopping."""
    lines = ["", f"### `{label}`, round by round", ""]
    if debate["votes"]:
        lines += ["The team stopped after each round (what `team.rounds` set to one more than that round gives on "
                  "the problems the full debate answered: a round never sees later ones), its majority vote against "
                  "the team's answer (paired on the same problems, exact McNemar p):", "",
                  "| after round | problems | vote accuracy | tokens per problem | right only here | right only in "
                  "the team's answer | p |", "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {v['round']} | {v['problems']} | {v['accuracy']:.1%} | {v['tokens']:.0f} | {v['only_round']} "
                  f"| {v['only_final']} | {v['p_value']:.3g} |" for v in debate["votes"]]
        lines.append("")
    if debate["seats"]:
        lines += _seat_lines(debate["seats"])
    return lines + _early_stop_lines(debate.get("early_stop"))


def _asked_line(task: dict[str, Any]) -> str:
    """Which problems were asked, and which systems answered fewer."""
    from pluribus.eval.generations import family

    gaps = task.get("unanswered") or {}
    asked = f"{task['problems']} problems of `{task['task']}` (split: {task['split']})" + (
        f"; the team and sc were asked the first {task['team_problems']} of them"
        if task.get("team_problems") and task["team_problems"] < task["problems"] else "")
    if gaps:
        # a skipped conversation (team.too_long: skip) leaves a system with fewer problems than it was asked
        said = "; ".join(f"{name} answered {g['answered']} of {g['asked']}" for name, g in gaps.items())
        asked += (f". Not every system answered all it was asked (the others were too long for its model and "
                  f"skipped): {said}. Each accuracy is over the problems its system answered (the problems column), "
                  "each comparison over the problems both answered.")
    else:
        sampled = [x for x in task["systems"] if family(x) in ("sc", "member-sc")]
        asked += "; every system answered all of them" + (
            f" ({', '.join(sampled)}: those the team answered, at most eval.sc_n; its problems column)." if sampled
            else ".")
    return asked


def _system_notes(task: dict[str, Any]) -> list[str]:
    """Estimated token counts, adapters, merges' errors, sc's samples."""
    lines: list[str] = []
    guessed = {name: r["tokens_estimated"] for name, r in task["systems"].items() if r.get("tokens_estimated")}
    if guessed:
        lines += ["", "Estimated token counts (a server that sent no usage, a model whose tokenizer is not available "
                  "offline: 4 characters a token): " + ", ".join(f"{n} on {k} problems" for n, k in guessed.items())
                  + "; their tokens per problem" + (" and sc's budget (the team's tokens)"
                                                     if "team" in guessed and "sc" in task["systems"] else "")
                  + " are approximate."]
    for name, a in (task.get("adapters") or {}).items():
        lines += ["", f"{name} uses adapter `{a['path']}` (sha256 {a['fingerprint']})."]
    for name, r in task["systems"].items():  # a merge's error vs the exact merge, from its record
        m = r.get("merge")
        if m and m.get("error") is not None:
            lines += ["", f"{name} is the {m['method']} merge ({m['kind']}), relative error vs the exact merge "
                      f"{m['error']:.3e}" + (f": {m['note']}." if m.get("note") else ".")]
    sc = task["systems"].get("sc")
    if sc:
        lines += ["", f"sc: {sc['samples_drawn']} samples drawn per problem, {sc['mean_samples_used']:.1f} used on "
                  f"average to spend the team's tokens on that problem (reached on {sc['budget_reached']:.0%} of "
                  "problems), then a majority vote."]
    for name, r in task["systems"].items():
        if r["system"] == "member-sc":
            lines += ["", _member_line(name, r)]
    return lines


def _member_line(name: str, r: dict[str, Any]) -> str:
    """Which seat member-sc sampled, with which weights, why, and how its samples met the team's budget."""
    w = r["member_weights"]
    weights = f"model `{w['model']}`" + (f", adapter `{w['adapter']}`" if w.get("adapter") else "")
    return (f"{name}: the team's seat `{r['member']}` ({weights}; chosen by {r['member_chosen_by']}) alone, as sc "
            f"samples the base agent: {r['samples_drawn']} samples drawn per problem, {r['mean_samples_used']:.1f} "
            f"used on average to spend the team's tokens on that problem (reached on {r['budget_reached']:.0%} of "
            "problems), then a majority vote.")


def _verifier_section(task: dict[str, Any]) -> list[str]:
    """prm-bon's and team-prm's choices, and each PRM's quality once."""
    lines: list[str] = []
    shown: set[str] = set()
    from pluribus.eval.generations import family

    order = ("prm-bon", "member-prm-bon", "team-prm")  # every generation's, generation 1's first
    choosers = sorted((n for n in task["systems"] if family(n) in order),
                      key=lambda n: (n[: len(n) - len(family(n))], order.index(family(n))))
    for name in choosers:
        lines += ["", *_verifier_lines(name, task["systems"][name])]
    for name in choosers:
        bon = task["systems"][name]
        if bon["verifier"] not in shown:  # once per PRM
            shown.add(bon["verifier"])
            lines += ["", *_quality_lines(bon)]
    return lines


def _comparison_lines(task: dict[str, Any]) -> list[str]:
    """Every system against the single base agent (exact McNemar)."""
    lines: list[str] = []
    if task.get("comparisons"):
        lines += ["", "Against the single base agent, problem by problem (two-sided exact McNemar test):", "",
                  "| system | baseline | problems | solved only by the system | solved only by the baseline | p |",
                  "|---|---|---:|---:|---:|---:|"]
        for c in task["comparisons"]:
            lines.append(f"| {c['system']} | {c['baseline']} | {c['problems']} | {c['wins']} | {c['losses']} "
                         f"| {c['p_value']:.3g} |")
    return lines


def _team_versus_lines(task: dict[str, Any]) -> list[str]:
    """The team (and team-prm) against its strongest member sampled at its budget (member-sc, member-prm-bon) and
    against the base agent at that budget (sc, prm-bon), problem by problem (exact McNemar); where member-sc ran."""
    rows = task.get("team_versus")
    if not rows:
        return []
    return ["", "The team (as team.aggregation chooses its answer, and team-prm: the PRM's choice among its "
            "transcripts) against its strongest "
            "member and the base agent, each sampled at the team's token budget (a majority vote, or the PRM's choice "
            "among the same samples), problem by problem (two-sided exact McNemar test):", "", *_VERSUS_HEAD,
            *(_versus_row(c) for c in rows)]


def _gain_lines(task: dict[str, Any]) -> list[str]:
    """Each system's share of the team's gain over the single agent, at what fraction of its tokens."""
    lines: list[str] = []
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
    return lines


def _early_stop_lines(stop: dict[str, Any] | None) -> list[str]:
    """What early stopping did (or would do) to the team's accuracy and tokens."""
    lines: list[str] = []
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
        lines += ["## Robustness", "", "The same problems perturbed, gold answers unchanged (problems: answered both "
                  "clean and perturbed, where the change, lost (right before, wrong after) and gained are counted; "
                  "p: exact McNemar of lost vs gained):", "",
                  "| system | perturbation | accuracy | 95% interval | problems | change vs clean | lost | gained | p |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, kinds in payload["robustness"].items():
            for kind, r in kinds.items():
                lines.append(f"| {name} | {kind} | {r['accuracy']:.1%} | {r['accuracy_low']:.1%} - "
                             f"{r['accuracy_high']:.1%} | {r.get('problems', '')} | {r['change']:+.1%} | {r['lost']} "
                             f"| {r['gained']} | {r['p_value']:.3g} |")
        lines.append("")
    if payload.get("generations"):
        lines += [*generations_section(payload["generations"]), ""]
    elif payload.get("next_generation"):
        lines += next_generation_lines()
    return "\n".join(lines)


def next_generation_lines() -> list[str]:
    """For a one-generation run whose team's debate trained experts: how to run the next generation."""
    return ["## Generations (debate, train, evolve)", "", "This run is one generation: its team debated, its experts "
            "learned from that. `generations: {count: 2, seats: [...]}` seats this run's experts and merges in a new "
            "debate, trains the next generation on it and puts both here side by side, with each generation's team "
            "against its best member and each student against the same generation's self-distillation baseline "
            "(pluribus' `configs/study.yaml` does so on the quickstart's run).", ""]


# ------------------------------------------------------------------------------------------ generations


def _versus_row(c: dict[str, Any]) -> str:
    return (f"| {c['system']} | {c['against']}: {c['versus']} | {c['problems']} | {c['accuracy']:.1%} "
            f"| {c['versus_accuracy']:.1%} | {c['difference']:+.1%} | {c['wins']} | {c['losses']} | {c['p_value']:.3g} |")


def generations_section(gens: dict[str, Any]) -> list[str]:
    """Per generation (pluribus.eval.generations): the team against its best member, sc at its budget (and PRM
    best-of-N where eval has it); each student against the base agent and the same generation's self baseline."""
    head = _VERSUS_HEAD
    base = gens.get("base_accuracy")
    lines = ["## Generations (debate, train, evolve)", "", "![accuracy per generation](generations.png)", "",
             "Every generation's systems on the same held-out problems; each comparison is paired on the problems "
             "both answered (two-sided exact McNemar test)" + (f"; the base single agent scores {base:.1%}." if
                                                                 base is not None else ".")]
    for g in gens["generations"]:
        lines += ["", f"### Generation {g['generation']}", "",
                  f"Team seats: {', '.join(g['members']) or 'none'}."
                  + (f" Self-distillation baseline: {g['self_baseline']}." if g.get("self_baseline") else "")
                  + (f" Not evaluated alone, so in no comparison (the best member is the best of the others): "
                     f"{', '.join(g['not_evaluated'])}." if g.get("not_evaluated") else "")]
        if g["team_comparisons"]:
            lines += ["", "The team against its best member and the same budget spent otherwise:", "", *head,
                      *(_versus_row(c) for c in g["team_comparisons"])]
        if g["student_comparisons"]:
            lines += ["", "Each student against the base agent and the self-distillation baseline of this "
                      "generation:", "", *head, *(_versus_row(c) for c in g["student_comparisons"])]
    checks = gens.get("stop_checks")
    if checks:
        lines += ["", f"Stop rule (generations.stop_if_no_gain): {checks['criterion']}.", ""]
        for c in checks["checks"].values():
            lines.append(f"- after generation {c['generation']}: best student {c['best']} {c['accuracy']:.1%} vs "
                         f"{c['previous_best']} {c['previous_accuracy']:.1%} on {c['problems']} problems: "
                         + ("no gain, stopped" if c["stop"] else "a gain, went on"))
    return lines


def generations_plot(payload: dict[str, Any]) -> bytes:
    """A PNG of accuracy per generation: one line per system name across generations (team, sc, each expert and
    merge), the base single agent as a dashed horizontal line; the legend beside the axes so no label overlaps."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from pluribus.eval.generations import family

    gens = payload["generations"]
    series: dict[str, dict[int, float]] = {}
    for g in gens["generations"]:
        for label, acc in g["accuracy"].items():
            series.setdefault(family(label), {})[g["generation"]] = acc * 100
    numbers = [g["generation"] for g in gens["generations"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    styles = {"team": dict(color="#C44E52", linewidth=2.4, marker="s"), "sc": dict(color="#8172B2", marker="^")}
    ax.set_prop_cycle(color=["#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"])
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], label=name, **styles.get(name, {"marker": "o"}))
    if gens.get("base_accuracy") is not None:
        ax.axhline(gens["base_accuracy"] * 100, color="#333333", linestyle="--", linewidth=1.2,
                   label=f"base single agent ({gens['base_accuracy']:.1%})")
    ax.set_xticks(numbers)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_xlim(min(numbers) - 0.3, max(numbers) + 0.3)
    ax.set_xlabel("generation")
    ax.set_ylabel("accuracy (%), held-out problems")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    main = (payload.get("tasks") or [{}])[0]
    n, k = main.get("problems"), main.get("team_problems")
    ax.set_title(f"accuracy per generation: {n} problems" + (f" (team and sc: the first {k})" if k and n and k < n
                                                              else ""), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_generations_plot(payload: dict[str, Any], out_dir: Path) -> Path:
    """Write generations.png (``generations_plot``) into ``out_dir``; returns its path."""
    return atomic_write_bytes(out_dir / "generations.png", generations_plot(payload))


BASE = "single-greedy"  # the base agent: every comparison's baseline
COLORS = {"single": "#4C72B0", "sc": "#8172B2", "member-sc": "#8172B2", "team": "#C44E52", "expert": "#55A868",
          "merged": "#DD8452", "distilled": "#55A868"}


def _overlaps(box: Any, others: list[Any]) -> bool:
    return any(box.overlaps(o) for o in others)


def _place_labels(ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Name each point with a label that overlaps no other label, point or the panel's edge: beside its point when
    there is room, else the nearest free place above or below (or on the left), joined to its point by a thin line.
    Points that coincide (two systems with the same accuracy and tokens) get a label each."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_px = fig.dpi / 72
    marks = [Bbox.from_bounds(*(ax.transData.transform((x, y)) - 5), 10, 10) for x, y, _ in points]
    placed: list[Any] = []
    for x, y, name in sorted(points, key=lambda p: -p[1]):
        px, py = ax.transData.transform((x, y))
        probe = ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, 0), va="center", fontsize=8)
        extent = probe.get_window_extent(renderer)
        w, h = extent.width, extent.height
        probe.remove()
        step = h + 2
        spots = [(side, k * step * sign) for k in range(0, 40) for sign in ((1, -1) if k else (1,))
                 for side in ("right", "left")]
        for side, dy in spots:
            left = px + 7 * to_px if side == "right" else px - 7 * to_px - w
            box = Bbox.from_bounds(left, py + dy - h / 2, w, h)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not _overlaps(box, placed) and not _overlaps(box, marks):
                break
        else:  # nowhere free (a crowded panel): beside the point, as before
            side, dy = "right", 0.0
            box = Bbox.from_bounds(px + 7 * to_px, py - h / 2, w, h)
        line = {"arrowstyle": "-", "color": "#888888", "lw": 0.6, "shrinkA": 0, "shrinkB": 4} if dy else None
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(7 if side == "right" else -7, dy / to_px),
                    va="center", ha="left" if side == "right" else "right", fontsize=8, arrowprops=line)
        placed.append(box)


def figure(payload: dict[str, Any]) -> Any:
    """The accuracy figure: one panel per task, accuracy (95% interval) against tokens per problem (log axis with
    plain numbers), one point per system, each named apart from the others; the base agent is a star with a
    dashed line at its accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    tasks = payload.get("tasks") or [{**payload, "name": "heldout"}]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.2 * len(tasks), 4.8), squeeze=False)
    panels = []
    for ax, task in zip(axes[0], tasks, strict=True):
        points = []
        for name, r in task["systems"].items():
            x, y = r["tokens_per_problem"], r["accuracy"] * 100
            err = [[y - r["accuracy_low"] * 100], [r["accuracy_high"] * 100 - y]]
            base = name == BASE
            ax.errorbar([x], [y], yerr=err, fmt="*" if base else "o", markersize=13 if base else 6, capsize=4,
                        color=COLORS.get(r["system"], "#333333"), zorder=3 if base else 2,
                        markerfacecolor="white" if r["mode"] == "sampled" else None)
            if base:
                ax.axhline(y, color=COLORS["single"], lw=0.8, ls="--", alpha=0.6, zorder=1)
            points.append((x, y, f"{name} (base agent)" if base else name))
        xs = [p[0] for p in points if p[0] > 0] or [1.0]
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.5, max(xs) * 2.2)  # room on the right for the labels of the costliest systems
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens per problem (log scale)")
        ax.set_ylabel("accuracy (%), 95% interval")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.set_title(f"{task['name']}: {task['problems']} problems of {task['task']}", fontsize=10)
        panels.append((ax, points))
    fig.tight_layout()
    fig.canvas.draw()  # the layout in pixels, so the labels can be placed apart
    for ax, points in panels:
        _place_labels(ax, points)
    return fig


def plot(payload: dict[str, Any]) -> bytes:
    """``figure`` as PNG bytes."""
    import io

    import matplotlib.pyplot as plt

    fig = figure(payload)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(payload: dict[str, Any], out_dir: Path) -> Path:
    """Write report.md and accuracy.png into ``out_dir``; returns the report path."""
    atomic_write_bytes(out_dir / "accuracy.png", plot(payload))
    return atomic_write_text(out_dir / "report.md", markdown(payload))
