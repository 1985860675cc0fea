"""The build stage: stores in, rsft / augmented / process datasets out (parquet + card); bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_dataset

from pluribus.config import BuildConfig
from pluribus.data.builders import build
from pluribus.data.builders.process import RolloutRequest, tokenize_stepwise
from pluribus.data.prompts import DEFAULT_PROMPTS
from pluribus.data.records import Trajectory, Turn
from pluribus.data.store import TrajectoryStore
from pluribus.errors import PluribusError

ALL = ["rsft", "augmented", "process"]


def turn(agent: str, rnd: int, response: str, answer: str | None, correct: bool) -> Turn:
    return Turn(agent, rnd, "m", response, answer, correct, 10, 20, 0.1)


def traj(pid: str, rounds: list[list[Turn]], gold: str = "12") -> Trajectory:
    final = rounds[-1][0].answer
    return Trajectory(pid, f"Question {pid}: what is 5+7?", gold, ["a", "b"], rounds, final, final == gold,
                      "majority", {"tokens_in": 40, "tokens_out": 80, "seconds": 0.4}, "run0")


RIGHT = "5 + 7 = 12\nSo the total is 12.\nThe answer is \\boxed{12}."
RIGHT2 = "Seven plus five:\n7 + 5 = 12\n\\boxed{12}"
WRONG = "5 + 7 = 11\nwrong step here\nThe answer is \\boxed{11}."


def sample_trajs() -> list[Trajectory]:
    return [
        traj("p1", [[turn("a", 0, WRONG, "11", False), turn("b", 0, RIGHT, "12", True)],
                    [turn("a", 1, RIGHT, "12", True), turn("b", 1, RIGHT2, "12", True)]]),
        traj("p2", [[turn("a", 0, RIGHT2, "12", True), turn("b", 0, RIGHT2, "12", True)],
                    [turn("a", 1, RIGHT2, "12", True), turn("b", 1, RIGHT, "12", True)]]),
        traj("p3", [[turn("a", 0, WRONG, "11", False), turn("b", 0, WRONG, "11", False)],
                    [turn("a", 1, WRONG, "11", False), turn("b", 1, WRONG, "11", False)]]),
    ]


def make_run(root: Path, trajs: list[Trajectory], config_hash: str = "cfg-a") -> Path:
    with TrajectoryStore(root / "trajectories", config_hash) as store:
        store.append([t.to_dict() for t in trajs])
    return root


def check_stepwise(rows, tokenizer) -> int:
    """Tokenize by the stepwise-supervision rule; every label must sit on the last token of its step."""
    checked = 0
    for row in rows:
        enc = tokenize_stepwise(row["prompt"], row["completions"], row["labels"], tokenizer, separator="\n")
        marked = [i for i, x in enumerate(enc["labels"]) if x != -100]
        assert marked == enc["step_ends"] and len(marked) == len(row["completions"])
        assert [enc["labels"][i] for i in marked] == [int(x) for x in row["labels"]]
        for i, step in zip(marked, row["completions"], strict=True):
            ids = enc["input_ids"]
            piece = tokenizer(step, add_special_tokens=False)["input_ids"] + tokenizer.encode(
                "\n", add_special_tokens=False)
            assert ids[i + 1 - len(piece) : i + 1] == piece  # the step (and its separator) ends at i
        checked += len(marked)
    return checked


class Scripted:
    """A completer that reaches the gold answer unless the prefix holds a wrong step; counts its calls."""

    name = "scripted"

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, requests: list[RolloutRequest]) -> list[str]:
        self.requests += len(requests)
        return ["\n\\boxed{0}" if "11" in r.prefix or "wrong" in r.prefix else "\n\\boxed{12}" for r in requests]


def test_builds_all_three_and_datasets_loads_them(tmp_path: Path, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    run = make_run(tmp_path / "run", sample_trajs())
    cfg = BuildConfig(kinds=ALL, rollouts_per_step=2, traces_per_problem=3)
    completer = Scripted()
    built = {b.kind: b for b in build(cfg, [run], completer=completer, progress=False)}
    assert set(built) == set(ALL)

    rsft = load_dataset(str(run / "datasets" / "rsft"), split="train")
    assert len(rsft) == built["rsft"].rows == 4  # p1: a, b; p2: a, b (different texts); p3: none
    # the user turn is exactly what the agents were asked: the debate's question prompt (no team given: its default)
    asked = DEFAULT_PROMPTS["question"].replace("{question}", "Question p1: what is 5+7?")
    assert rsft[0]["messages"] == [{"role": "user", "content": asked}, {"role": "assistant", "content": RIGHT}]
    assert set(rsft.column_names) == {"messages", "problem_id", "agent", "round"}

    aug = load_dataset(str(run / "datasets" / "augmented"), split="train")
    kinds = [(r["problem_id"], r["kind"]) for r in aug]
    assert kinds.count(("p1", "corrective")) == 1 and ("p3", "diverse") not in kinds
    assert built["augmented"].stats["counts"]["rows of kind corrective"] == 1

    proc = load_dataset(str(run / "datasets" / "process"), split="train")
    assert {"prompt", "completions", "labels", "scores", "problem_id", "debate"} <= set(proc.column_names)
    by_key = {(r["problem_id"], r["agent"], r["round"]): r for r in proc}
    wrong = by_key[("p1", "a", 0)]  # corrected by the debate: listed first, its steps marked
    assert wrong["completions"] == WRONG.split("\n")
    assert wrong["scores"] == [0.0, 0.0, 0.0] and wrong["labels"] == [False, False, False]
    assert wrong["debate"] == ["corrected", "corrected", "corrected"]
    right = by_key[("p1", "a", 1)]
    assert right["labels"] == [True, True, True] and right["debate"] == ["final"] * 3
    assert completer.requests == sum(len(r["completions"]) - 1 for r in proc) * 2  # the last step is not rolled out

    assert check_stepwise(proc, AutoTokenizer.from_pretrained(smollm2_dir)) == built["process"].stats["counts"]["steps"]

    shepherd = load_dataset(str(run / "datasets" / "process"), data_dir="math_shepherd", split="train")
    assert len(shepherd) == len(proc) and shepherd[0]["label"].endswith(("+", "-"))

    card = (run / "datasets" / "process" / "README.md").read_text()
    assert "cfg-a" in card and "## Labels" in card and "rollouts per step | 2" in card
    assert "| steps |" in card and "`run/trajectories`" in card and "equals the gold answer" in card
    assert str(tmp_path) not in card  # a card may be pushed: no path of this machine
    stats = json.loads((run / "datasets" / "process" / "stats.json").read_text())
    assert stats["labels"]["good steps"] + stats["labels"]["bad steps"] == stats["counts"]["steps"]


def test_rollouts_are_stored_and_resumed(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sample_trajs())
    cfg = BuildConfig(kinds=["process"], rollouts_per_step=2)
    first = build(cfg, [run], completer=Scripted(), progress=False)[0]
    stored = list(TrajectoryStore(run / "rollouts").iter_records())
    assert len(stored) == first.rows

    class Refuse:
        name = "scripted"  # the same completer as far as the rollout store can tell

        def __call__(self, requests: list[RolloutRequest]) -> list[str]:
            raise AssertionError("stored rollouts must not be generated again")

    again = build(cfg, [run], completer=Refuse(), overwrite=True, progress=False)[0]
    assert again.stats == first.stats
    with pytest.raises(PluribusError, match="--new-run"):  # other rollout settings: refused, not mixed
        build(cfg.model_copy(update={"rollouts_per_step": 3}), [run], completer=Scripted(), overwrite=True,
              progress=False)
    moved = build(cfg.model_copy(update={"rollouts_per_step": 3}), [run], completer=Scripted(), overwrite=True,
                  new_run=True, progress=False)[0]
    assert moved.stats["counts"]["rollouts"] == 3 * (moved.stats["counts"]["steps"] - moved.rows)


def test_no_correct_trajectory_writes_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [sample_trajs()[2]])
    for kind in ("rsft", "augmented"):
        with pytest.raises(PluribusError, match="no correct trajectory .* nothing was written"):
            build(BuildConfig(kinds=ALL), [run], kinds=[kind], completer=Scripted(), progress=False)
    assert not (run / "datasets").exists() and not (run / "rollouts").exists()


def test_corrupt_lines_are_reported_and_skipped_only_when_asked(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sample_trajs())
    shard = run / "trajectories" / "shard-00000.jsonl"
    with shard.open("a") as f:
        f.write('{"problem_id": "p4", "question": "half a record"}\n')  # JSON, but not a Trajectory
        f.write('{"problem_id": "p5", "quest')  # torn last line
    with pytest.raises(PluribusError, match=r"shard-00000.jsonl' line 4 is corrupt"):
        build(BuildConfig(), [run], progress=False)
    assert not (run / "datasets").exists()
    built = build(BuildConfig(skip_corrupt=True), [run], progress=False)[0]
    assert built.stats["skipped_lines"] == ["trajectories/shard-00000.jsonl:4", "trajectories/shard-00000.jsonl:5"]
    card = (built.path / "README.md").read_text()
    assert "Corrupt store lines skipped (build.skip_corrupt) (2)" in card
    assert "| 3 | 2 |" in card  # 3 trajectories read, 2 lines skipped


def test_stores_of_different_configs_are_refused(tmp_path: Path) -> None:
    trajs = sample_trajs()
    a = make_run(tmp_path / "a", trajs[:2], "cfg-a")
    b = make_run(tmp_path / "b", trajs[2:], "cfg-b")
    with pytest.raises(PluribusError, match="different configs cannot be mixed"):
        build(BuildConfig(), [a, b], out_root=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    c = make_run(tmp_path / "c", [trajs[1]], "cfg-a")
    built = build(BuildConfig(), [a / "trajectories", c], out_root=tmp_path / "out", progress=False)[0]
    assert built.stats["counts"]["trajectories used"] == 2  # p2 is in both stores: used once


def test_step_rule_without_steps_is_reported_per_problem(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sample_trajs())
    cfg = BuildConfig(kinds=["process"], step_rule="regex", step_regex=r"(?m)^\d+ \+ \d+ = \d+$",
                      rollouts_per_step=1, traces_per_problem=4)
    built = build(cfg, [run], completer=Scripted(), progress=False)[0]
    # RIGHT's first line and RIGHT2's second line match; WRONG's "5 + 7 = 11" too; none is missing here
    assert built.stats["counts"]["traces without steps"] == 0
    cfg = cfg.model_copy(update={"step_regex": r"(?m)^Seven.*$"})  # only RIGHT2 has such a line
    built = build(cfg, [run], completer=Scripted(), overwrite=True, new_run=True, progress=False)[0]
    missing = built.stats["no_steps"]
    assert "p1/a/r0" in missing and "p3/a/r1" in missing and "p2/a/r1" not in missing
    assert built.stats["counts"]["traces without steps"] == len(missing)
    card = (built.path / "README.md").read_text()
    assert f"Traces where the step rule found no step ({len(missing)})" in card and "`p1/a/r0`" in card
    with pytest.raises(PluribusError, match="found no labellable trace"):
        build(cfg.model_copy(update={"step_regex": r"(?m)^Step \d+:.*$"}), [run], completer=Scripted(),
              overwrite=True, new_run=True, progress=False)


def test_cli_build_from_a_store_with_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pluribus.cli import app

    run = make_run(tmp_path / "run", sample_trajs())
    # no recipe.yaml beside the store: the prompt the agents were asked is unknown, and a default one is refused
    res = CliRunner().invoke(app, ["build", "--store", str(run), "--kind", "rsft", "--no-progress"])
    assert isinstance(res.exception, PluribusError) and "\n" not in str(res.exception)
    assert "no recipe.yaml beside the store" in str(res.exception) and not (run / "datasets").exists()
    res = CliRunner().invoke(app, ["build", "build.k=1", "build.prompt_template=Solve {question}", "--store", str(run),
                                   "--kind", "rsft", "--kind", "augmented", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "augmented" in res.output and (run / "datasets" / "rsft" / "README.md").is_file()
    aug = load_dataset(str(run / "datasets" / "augmented"), split="train")
    assert max(sum(r["kind"] == "diverse" and r["problem_id"] == p for r in aug) for p in ("p1", "p2")) == 1
    assert {r["messages"][0]["content"] for r in aug} == {f"Solve Question {p}: what is 5+7?" for p in ("p1", "p2")}

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = CliRunner().invoke(app, ["build", "--store", str(run), "--kind", "rsft", "--overwrite",
                                   "--push-to-hub", "me/data"])
    assert isinstance(res.exception, PluribusError) and "needs a token" in str(res.exception)


def test_runs_with_the_same_kind_load_their_own_rows(tmp_path: Path) -> None:
    """Two run folders, same dataset name: load_dataset(folder) must not serve one run's cached rows for another."""
    trajs = sample_trajs()
    one = make_run(tmp_path / "one", trajs[:1])
    two = make_run(tmp_path / "two", trajs[:2])
    build(BuildConfig(), [one], progress=False)
    build(BuildConfig(), [two], progress=False)
    assert len(load_dataset(str(one / "datasets" / "rsft"), split="train")) == 2
    assert len(load_dataset(str(two / "datasets" / "rsft"), split="train")) == 4
