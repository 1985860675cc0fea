"""`pluribus view`: the page's data from a run folder in the stages' formats, and the command's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pluribus.view import collect, markdown_html, page, write_view
from tests.view_run import KNOWN, SECRET, make_view_run

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _embedded(html: str) -> dict:
    start = html.index('<script type="application/json" id="data">') + len('<script type="application/json" id="data">')
    return json.loads(html[start: html.index("</script>", start)])


def test_the_page_holds_every_part_of_the_run_and_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    run = make_view_run(tmp_path / "run")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = _cli("view", str(run), "-o", str(tmp_path / "page.html"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {tmp_path / 'page.html'}"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # -o: nothing written in the run
    html = (tmp_path / "page.html").read_text()
    assert SECRET not in html and "S3cretToken" not in html  # api_key, the URL's credentials, $HF_TOKEN
    assert "src=\"http" not in html and "<link" not in html  # nothing fetched: it opens from disk
    data = _embedded(html)
    assert data == json.loads(json.dumps(collect(run)))
    assert "api_key: '***'" in data["recipe"] and "https://***@example.com/v1" in data["recipe"]
    # eval: the report's tables, the plot inlined
    assert "<table>" in data["eval"]["html"] and 'src="data:image/png;base64,' in data["eval"]["html"]
    assert "rl-greedy" in data["eval"]["html"]
    # every trajectory store, the debate first, each problem with every round of every agent
    names = [s["name"] for s in data["stores"]]
    assert names[0] == "debate" and "eval/single-greedy" in names and len(names) == 5
    debate = data["stores"][0]
    assert len(debate["problems"]) == 120 and KNOWN in {p["id"] for p in debate["problems"]}
    p = debate["problems"][0]
    assert len(p["rounds"]) == 2 and all(len(r) == 3 for r in p["rounds"]) and p["rounds"][0][0]["r"]
    assert sum(n for _, n in p["votes"]) == 3
    # process rows with their Monte-Carlo scores, labels and the PRM's per-step score
    rows = data["process"][0]["rows"]
    assert len(rows) == 30 and set(rows[0]["extra"]) == {"prm_scores"}
    assert len(rows[0]["scores"]) == len(rows[0]["steps"]) == len(rows[0]["labels"])
    assert {d["name"]: d["rows"] for d in data["datasets"]}["process"] == 30
    # curves: from the record's log_history, and from the checkpoint when the record has none
    experts = {e["name"]: e for e in data["experts"]}
    assert set(experts) == {"prm", "rl", "rsft"}
    assert len(experts["rsft"]["curves"]["loss"]) == 10 and len(experts["rl"]["curves"]["reward"]) == 10
    assert len(experts["prm"]["curves"]["loss"]) == 5
    # the page's changes of mind are the debate summary's corrected and lost answers
    from pluribus.data.store import TrajectoryStore
    from pluribus.stages.debate import summarize

    shown = summarize(list(TrajectoryStore(run / "trajectories").iter_records()))
    assert sum(p["fixed"] for p in debate["problems"]) == shown.corrected > 0
    assert sum(p["broke"] for p in debate["problems"]) == shown.lost > 0
    assert sum(p["switched"] for p in debate["problems"]) > 0
    merge = data["merges"][0]
    assert merge["name"] == "merged" and merge["lines"][0].startswith("method task_arithmetic (adapters -> adapter)")
    assert merge["spec"].startswith("merge_method: task_arithmetic")


def test_changes_of_mind_and_the_vote_are_classified() -> None:
    from pluribus.view import _problem
    from tests.data.test_builders import sample_trajs, traj, turn

    p1 = _problem(sample_trajs()[0].to_dict())  # agent a: 11 (wrong) then 12 (right)
    assert [t["ch"] for t in p1["rounds"][1]] == ["fixed", ""] and p1["fixed"] == 1 and p1["broke"] == 0
    t = traj("p9", [[turn("a", 0, "x", "12", True), turn("b", 0, "x", "11", False)],
                    [turn("a", 1, "x", "13", False), turn("b", 1, "x", None, None)]])
    p9 = _problem(t.to_dict())
    assert [x["ch"] for x in p9["rounds"][1]] == ["broke", "switched"]
    assert [list(v) for v in p9["votes"]] == [["13", 1], ["(unparsable)", 1]]


def test_a_run_with_only_its_debate_shows_the_rest_as_absent(tmp_path: Path) -> None:
    from tests.data.test_builders import make_run, sample_trajs

    run = make_run(tmp_path / "early", sample_trajs())
    # a writer killed mid-line (or still writing): the torn line is counted, not shown, and the store not touched
    shard = run / "trajectories" / "shard-00000.jsonl"
    with shard.open("ab") as f:
        f.write(b'{"problem_id": "p4", "quest')
    torn = shard.read_bytes()
    out = write_view(run)
    assert out == run / "view.html" and shard.read_bytes() == torn
    data = _embedded(out.read_text())
    assert data["eval"] is None and data["process"] == [] and data["experts"] == [] and data["merges"] == []
    assert data["recipe"] is None and data["stages"] == []
    assert [len(s["problems"]) for s in data["stores"]] == [3] and data["stores"][0]["unreadable"] == 1
    assert "No eval yet" in out.read_text()


def test_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    for target in (tmp_path / "notes", tmp_path / "missing"):
        proc = _cli("view", str(target))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and str(target) in lines[0], proc.stderr
        assert "runs/quickstart" in lines[0]
    assert not (tmp_path / "notes" / "view.html").exists()


def test_report_markdown_becomes_tables_and_inlined_images() -> None:
    body, used = markdown_html("# Eval of run `q`\n\n![acc](accuracy.png)\n\n| a | b |\n|---|---:|\n| x<y | 1 |\n\n"
                               "two\nlines\n", {"accuracy.png": "data:image/png;base64,AAAA"})
    assert "<h2>Eval of run <code>q</code></h2>" in body and used == {"accuracy.png"}
    assert '<img alt="acc" src="data:image/png;base64,AAAA">' in body
    assert "<tr><td>x&lt;y</td><td>1</td></tr>" in body and "---" not in body and "<p>two lines</p>" in body


def test_script_end_tags_in_the_data_cannot_break_the_page() -> None:
    html = page({"run": {"name": "r", "path": "/r"}, "q": "</script><script>alert(1)</script>\u2028"})
    assert html.count("</script>") == 2  # the data's own script element and the renderer's
    assert _embedded(html)["q"] == "</script><script>alert(1)</script>\u2028"


def test_process_rows_in_trl_conversational_form_are_shown(tmp_path: Path) -> None:
    """A process dataset from elsewhere (TRL's stepwise format, conversational prompt, no problem_id) still reads."""
    from pluribus.layout import RunLayout
    from pluribus.view import _process
    from tests.view_run import _parquet

    _parquet(tmp_path / "datasets" / "process", [{
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}], "completions": ["2 + 2 = 4", "4"],
        "labels": [True, True]}])
    (row,) = _process(RunLayout(tmp_path))[0]["rows"]
    assert row["prompt"] == "What is 2 + 2?" and row["id"] == "" and row["scores"] == [] and row["extra"] == {}


def test_votes_and_changes_of_mind_follow_the_debates_rule_and_the_judge_is_shown() -> None:
    """"0.5" and "1/2" are one answer (answers.vote_key, as the debate's majority counts): rewriting an answer is no
    change of mind, and the vote counts them together; the judge's turns are shown, not dropped."""
    from pluribus.data.records import Trajectory, Turn
    from pluribus.view import _problem

    def turn(agent: str, rnd: int, answer: str | None, correct: bool | None) -> Turn:
        return Turn(agent, rnd, "m", f"so {answer}", answer, correct, 10, 20, 0.1)

    rounds = [[turn("a", 0, "0.5", True), turn("b", 0, "3", False), turn("c", 0, "2", False)],
              [turn("a", 1, "1/2", True), turn("b", 1, "3.0", False), turn("c", 1, "0.5", True)]]
    judge = turn("judge", 1, "1/2", True)
    t = Trajectory("p1", "Half of 1?", "1/2", ["a", "b", "c"], rounds, "1/2", True, "judge",
                   {"tokens_in": 1, "tokens_out": 60}, "run0", {"judge": [judge.to_dict()], "tie_broken": False})
    p = _problem(t.to_dict())
    assert [x["ch"] for x in p["rounds"][1]] == ["", "", "fixed"]  # a and b wrote the same answer again
    assert (p["fixed"], p["broke"], p["switched"]) == (1, 0, 0)
    assert [list(v) for v in p["votes"]] == [["1/2", 2], ["3.0", 1]]
    assert [(j["a"], j["c"], j["round"]) for j in p["judge"]] == [("1/2", True, 1)] and p["agg"] == "judge"
    # another wrong answer is a switch; right to unparsable is broken, unparsable to right fixed
    t = replace(t, rounds=[[turn("a", 0, "3", False), turn("b", 0, "1/2", True), turn("c", 0, None, None)],
                           [turn("a", 1, "4", False), turn("b", 1, None, None), turn("c", 1, "0.5", True)]])
    assert [x["ch"] for x in _problem(t.to_dict())["rounds"][1]] == ["switched", "broke", "fixed"]


def test_the_page_data_is_strict_json_without_markup(tmp_path: Path) -> None:
    """nan / inf (a diverged loss) are no JSON numbers: the browser's JSON.parse would refuse the whole page; and no
    "<" may stand in the script element (a "<!--<script>" in a response would keep it open past its end tag)."""
    from tests.view_run import HOSTILE, add_hostile

    run = make_view_run(tmp_path / "run", problems=3, eval_=False)
    add_hostile(run)
    html = write_view(run).read_text()
    start = html.index('<script type="application/json" id="data">') + len('<script type="application/json" id="data">')
    text = html[start: html.index("</script>", start)]
    assert "<" not in text and "{{" not in html.split("<script", 1)[0]

    def no_constant(name: str) -> None:
        raise AssertionError(f"{name} in the page's JSON")

    data = json.loads(text, parse_constant=no_constant)
    problem = next(p for p in data["stores"][0]["problems"] if p["id"] == "hostile-1")
    assert problem["q"].endswith(HOSTILE) and problem["rounds"][0][0]["r"].endswith(HOSTILE)
    diverged = next(e for e in data["experts"] if e["name"] == "diverged")
    assert diverged["curves"]["loss"] == [[1, 2.0]] and diverged["undrawn"] == {"loss": 2, "grad_norm": 2}
    assert diverged["metrics"] == {"train_loss": "nan"}  # shown as what it is, not dropped


def test_process_labels_and_scores_of_other_writers_are_read_as_they_mean(tmp_path: Path) -> None:
    """Labels as 1 / 0 are good / bad, a step without a label is no label (not "bad"), a missing PRM score is n/a,
    and a column of booleans is not taken for a score."""
    from pluribus.layout import RunLayout
    from pluribus.view import _process
    from tests.view_run import _parquet

    _parquet(tmp_path / "datasets" / "process", [
        {"prompt": "q1", "completions": ["a", "b", "c"], "labels": [1, 0, 1], "scores": [0.9, float("nan"), 0.5],
         "prm": [0.8, None, 0.1], "flags": [True, False, True]},
        {"prompt": "q2", "completions": ["a", "b"], "labels": [1], "scores": [], "prm": [None, None],
         "flags": [False, False]}])
    first, second = _process(RunLayout(tmp_path))[0]["rows"]
    assert first["labels"] == [True, False, True] and first["scores"] == [0.9, None, 0.5]
    assert first["extra"] == {"prm": [0.8, None, 0.1]}  # flags: booleans, no score
    assert second["labels"] == [True, None] and second["extra"] == {} and second["round"] is None


def test_a_recipe_that_does_not_parse_is_not_shown(tmp_path: Path) -> None:
    """Secrets are hidden by their key; a recipe.yaml that does not parse has no keys to go by, so its text stays out."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("team: {agents: [{api_key: plainsecret123, name: a}\n")  # unclosed
    (run / "merged" / "m").mkdir(parents=True)  # a merge spec: secrets hidden by key as in the recipe
    (run / "merged" / "m" / "merge.yaml").write_text("merge_method: ties\nhub_token: plainsecret456\n")
    data = collect(run)
    assert "plainsecret" not in json.dumps(data) and "not readable YAML" in data["recipe"]
    assert data["merges"][0]["spec"] == "merge_method: ties\nhub_token: '***'\n"


def test_a_training_still_running_shows_its_latest_checkpoints_curve(tmp_path: Path) -> None:
    """adapters/<name>.checkpoints without adapters/<name> (the trainer is still at it): its curve so far, marked
    as not finished; checkpoints with no logged step are no expert."""
    run = tmp_path / "run"
    for name, history in (("rsft", [{"loss": 2.0, "step": 5}, {"loss": 1.5, "step": 10}]), ("empty", [])):
        ckpt = run / "adapters" / f"{name}.checkpoints" / "checkpoint-10"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (expert,) = collect(run)["experts"]
    assert expert["name"] == "rsft" and expert["running"] and expert["curves"]["loss"] == [[5, 2.0], [10, 1.5]]
    assert expert["path"].endswith("rsft.checkpoints")


def test_an_unreadable_record_is_not_called_missing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "merged" / "m").mkdir(parents=True)
    (run / "merged" / "m" / "merge_report.json").write_text("{torn")
    (run / "stages.json").write_text("{torn")
    html = write_view(run).read_text()
    data = _embedded(html)
    assert data["run"]["stages_unreadable"] and data["stages"] == []
    assert data["merges"][0]["report"] is None and data["merges"][0]["report_file"]
