"""A small run folder in the formats the stages write, for `pluribus view`'s tests (no model needed).

Trajectories go through the real store, the eval payload through the real scoring and report code (report.md,
accuracy.png), the merge report through MergeSummary; the process and rsft datasets are parquet in the builders'
layout; the training records carry the fields distill.output.training_record writes.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from pluribus.data.records import Trajectory, Turn
from pluribus.data.store import TrajectoryStore

SECRET = "hf_" + "S3cretTokenValue" * 2  # must never reach the page
KNOWN = "synth-word1-0-81"  # a problem the browser test searches for: one agent fixed, one broke, one switched


def _turn(agent: str, rnd: int, answer: str | None, gold: str, cut: bool = False) -> Turn:
    text = f"{agent} works it out: 3 + 4 = {answer}.\nThe answer is \\boxed{{{answer}}}." if answer else "I am not sure."
    return Turn(agent, rnd, "smollm2-135m", text, answer, None if answer is None else answer == gold, 60, 24,
                0.2, {"finish_reason": "length" if cut else "stop"})


def trajectories(n: int, agents: list[str], rounds: int, seed: int = 0) -> list[Trajectory]:
    """``n`` problems debated by ``agents`` over ``rounds``: agents fix, break and switch answers at random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        gold = str(7 + i % 5)
        pid = f"synth-word1-0-{i}"
        answers = [rng.choice([gold, gold, str(int(gold) + 1), None]) for _ in agents]
        rows = []
        for r in range(rounds):
            if r:  # each agent may move towards the majority or away from it
                answers = [rng.choice([a, gold, str(int(gold) - 1)]) for a in answers]
            rows.append([_turn(a, r, ans, gold, cut=rng.random() < 0.1) for a, ans in zip(agents, answers, strict=True)])
        votes = [a for a in answers if a is not None]
        final = max(set(votes), key=votes.count) if votes else None
        out.append(Trajectory(pid, f"Zoe has {i} coins. She finds {gold} more coins and loses {i}. How many coins "
                              "does Zoe have now?", gold, agents, rows, final, final == gold, "majority",
                              {"tokens_in": 60.0 * len(agents) * rounds, "tokens_out": 24.0 * len(agents) * rounds,
                               "seconds": 0.5}, "run0"))
    return out


def _store(folder: Path, trajs: list[Trajectory]) -> None:
    with TrajectoryStore(folder, "cfg") as store:
        store.append([t.to_dict() for t in trajs])


def _parquet(folder: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "data" / "train-00000-of-00001.parquet")


def make_view_run(root: Path, problems: int = 120, *, eval_: bool = True) -> Path:
    """A run folder ``root`` with a debate of ``problems``, datasets, three experts, a merge and (``eval_``) an eval."""
    from pluribus.eval.report import write_report
    from pluribus.eval.scoring import compare, outcomes, score
    from pluribus.merge import MergeSummary

    root.mkdir(parents=True)
    agents = ["solver", "checker", "skeptic"]
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "name": root.name, "root": str(root.parent), "seed": 0,
        "task": {"source": "synthetic", "n": problems, "synthetic": {"level": "word1"}},
        "team": {"rounds": 2, "agents": [
            {"name": "solver", "model": "smollm2-135m"},
            {"name": "checker", "model": "gpt-4o-mini", "backend": "openai", "api_key_env": "OPENAI_API_KEY",
             "base_url": f"https://user:{SECRET}@example.com/v1", "api_key": SECRET},
            {"name": "skeptic", "model": "smollm2-135m"}]},
    }, sort_keys=False))
    team = trajectories(problems, agents, 2)
    _store(root / "trajectories", team)

    rows = []
    for t in team[:30]:
        steps = t.rounds[-1][0].response.splitlines()
        # as the builder scores: Monte-Carlo fractions, the last step its trace's own grade
        scores = [round(random.Random(t.problem_id).random(), 2) for _ in steps[:-1]] + [float(bool(
            t.rounds[-1][0].correct))]
        rows.append({"prompt": t.question, "completions": steps, "labels": [s >= 0.5 for s in scores],
                     "scores": scores, "problem_id": t.problem_id, "agent": "solver", "round": 1,
                     "debate": ["kept" for _ in steps], "prm_scores": [round(1 - s / 2, 3) for s in scores]})
    _parquet(root / "datasets" / "process", rows)
    _parquet(root / "datasets" / "rsft", [{"messages": [{"role": "user", "content": t.question},
                                                        {"role": "assistant", "content": t.rounds[-1][0].response}],
                                           "problem_id": t.problem_id, "agent": "solver", "round": 1}
                                          for t in team if t.final_correct])

    history = [{"loss": 2.0 / (s + 1) + 0.1, "grad_norm": 1.5, "learning_rate": 2e-4 * (1 - s / 10), "epoch": s / 5,
                "step": s} for s in range(1, 11)]
    for name, objective, hist in (("rsft", "rsft", history),
                                  ("rl", "rl", [{**h, "reward": 0.1 * h["step"], "accuracy": 0.05 * h["step"]}
                                                for h in history])):
        folder = root / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "training_record.json").write_text(json.dumps({
            "objective": objective, "expert": name, "base_model": "smollm2-135m", "base_model_path": "/models/x",
            "recipe": {}, "dataset": {"path": str(root / "datasets" / "rsft"), "files": {}}, "data": {"rows": 40},
            "processes": 1, "metrics": {"train_loss": 0.42, "train_runtime": 12.5}, "log_history": hist,
            "pluribus_version": "0", "finished_at": "2026-12-07T08:00:00Z"}))
    prm = root / "adapters" / "prm"  # a record without log_history: the curve comes from its checkpoint
    prm.mkdir(parents=True)
    (prm / "training_record.json").write_text(json.dumps({"objective": "prm", "expert": "prm", "metrics": {}}))
    ckpt = root / "adapters" / "prm.checkpoints" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": history[:5]}))

    merged = root / "merged" / "merged"
    merged.mkdir(parents=True)
    (merged / "merge_report.json").write_text(json.dumps(asdict(MergeSummary(
        "task_arithmetic", "adapters -> adapter", str(merged), [str(root / "adapters" / n) for n in ("rsft", "rl")],
        ranks_in=[[16], [16]], ranks_out=[16], error=1.2e-7, seconds=0.8))))
    (merged / "merge.yaml").write_text("merge_method: task_arithmetic\nmodels:\n  - model: adapters/rsft\n")

    if eval_:
        systems = {"single-greedy": ("single", trajectories(40, ["single"], 1, seed=1)),
                   "team": ("team", team[:40]),
                   "rsft-greedy": ("expert", trajectories(40, ["single"], 1, seed=2)),
                   "rl-greedy": ("expert", trajectories(40, ["single"], 1, seed=3)),
                   "merged-greedy": ("merged", trajectories(40, ["single"], 1, seed=3))}
        for label, (_, trajs) in systems.items():
            if label != "team":
                _store(root / "eval" / label / "trajectories", trajs)
        records = {label: [t.to_dict() for t in trajs] for label, (_, trajs) in systems.items()}
        results = {label: asdict(score(records[label], system, "greedy")) for label, (system, _) in systems.items()}
        task = {"name": "heldout", "task": "synthetic:word1", "split": "heldout", "problems": 40, "team_problems": 40,
                "systems": results, "comparisons": compare({k: outcomes(v) for k, v in records.items()})}
        payload = {"run": root.name, "task": task["task"], "split": "heldout", "problems": 40, "systems": results,
                   "comparisons": task["comparisons"], "tasks": [task]}
        (root / "eval" / "results.json").write_text(json.dumps(payload, indent=2))
        write_report(payload, root / "eval")
    return root


HOSTILE = ('<img src=x onerror="window.pwned=1"><!--<script>window.pwned=2</script> '
           '</script><script>window.pwned=3</script>{{DATA}} \u2028')  # markup a question or a response may hold


def add_hostile(run: Path) -> None:
    """A problem whose question, answers, agent names and responses are markup, and an expert whose loss diverged
    (nan, inf in its log_history): the page must show them as text and still render."""
    t = trajectories(1, ["solver", "<b>checker</b>"], 2, seed=5)[0]
    rounds = [[replace(turn, response=f"{turn.response}\n{HOSTILE}") for turn in rnd] for rnd in t.rounds]
    rounds[-1][0] = replace(rounds[-1][0], answer='7"><b>x</b>')
    t = replace(t, problem_id="hostile-1", question=f"What is 3 + 4? {HOSTILE}", rounds=rounds)
    with TrajectoryStore(run / "trajectories", "cfg") as store:
        store.append([t.to_dict()])
    folder = run / "adapters" / "diverged"
    folder.mkdir(parents=True)
    history = [{"loss": v, "grad_norm": v, "step": s} for s, v in ((1, 2.0), (2, float("nan")), (3, float("inf")))]
    (folder / "training_record.json").write_text(json.dumps({  # json writes NaN / Infinity, as Python's does
        "objective": "rsft", "metrics": {"train_loss": float("nan")}, "log_history": history}))
