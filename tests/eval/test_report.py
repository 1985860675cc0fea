"""The eval report's accuracy plot: every system named apart from the others, plain tick numbers, the base marked."""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict

from pluribus.eval.report import figure, plot
from pluribus.eval.scoring import score
from tests.view_run import trajectories


def _payload() -> dict:
    # rl-greedy and merged-greedy score the same on the same problems: their points coincide (as in the quickstart)
    seeds = {"single-greedy": 1, "team": 0, "rsft-greedy": 2, "augmented-greedy": 4, "rl-greedy": 3,
             "merged-greedy": 3, "self-rsft-greedy": 5}
    systems = {}
    for label, seed in seeds.items():
        agents, rounds = (["a", "b", "c"], 2) if label == "team" else (["a"], 1)
        recs = [t.to_dict() for t in trajectories(40, agents, rounds, seed=seed)]
        systems[label] = asdict(score(recs, label.split("-")[0] if label != "team" else "team", "greedy"))
    task = {"name": "heldout", "task": "synthetic:word1", "problems": 40, "systems": systems}
    return {**task, "tasks": [task]}


def test_labels_are_placed_apart_and_ticks_are_plain_numbers() -> None:
    import matplotlib.pyplot as plt

    payload = _payload()
    fig = figure(payload)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        labels = list(ax.texts)
        names = sorted(t.get_text() for t in labels)
        assert names == sorted(n + (" (base agent)" if n == "single-greedy" else "") for n in payload["systems"])
        from matplotlib.text import Text

        boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, without its leader line
        for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels, strict=True), 2):
            assert not a.overlaps(b), (ta.get_text(), tb.get_text())
        frame = ax.get_window_extent(renderer)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)  # inside the panel
        ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert ticks and all(re.fullmatch(r"[\d,.]+", t) for t in ticks), ticks  # "200", never "2x10^2"
        assert any(line.get_linestyle() == "--" for line in ax.get_lines())  # the base agent's accuracy
    finally:
        plt.close(fig)
    assert plot(payload).startswith(b"\x89PNG")




def test_a_one_generation_report_points_to_generations_where_its_debate_trained_experts() -> None:
    """The quickstart's report (one generation) says how to run the next one (the flag: tests/test_study.py)."""
    from pluribus.eval.report import next_generation_lines

    text = "\n".join(next_generation_lines())
    assert text.startswith("## Generations (debate, train, evolve)") and "`generations: {count: 2, seats: [...]}`" in text


def test_the_summary_names_a_system_s_agents_only_where_they_ran_apart() -> None:
    from pluribus.stages.eval import where_systems_ran

    cpu, gpu = {"device": "cpu", "dtype": "bfloat16"}, {"device": "cuda:0", "dtype": "bfloat16"}
    line = where_systems_ran({"sc": {f"sc{i}": cpu for i in range(15)}, "team": {"a": cpu, "judge": gpu},
                              "rsft-greedy": {"a": cpu}})
    assert line == "sc, team a, rsft-greedy: cpu bfloat16; team judge: cuda:0 bfloat16"
