"""Debate engine: topologies, aggregation, trimming, batching (scripted backend); real runs with tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pluribus.config import AgentConfig, Recipe, SamplingConfig, TaskConfig, TeamConfig, load_recipe
from pluribus.data.backends import Generation, backend_key
from pluribus.data.debate import TRIM_MARK, build_team, debate_step, majority
from pluribus.data.prompts import DEFAULT_PROMPTS, fill, resolve_prompts
from pluribus.data.records import Problem, Turn
from pluribus.data.store import TrajectoryStore
from pluribus.errors import PluribusError
from pluribus.stages.debate import config_hash, run_debate

REPO = Path(__file__).resolve().parents[2]
# One torch thread in tests and their subprocesses: on a shared CPU, spinning OpenMP threads make
# generation many times slower.
ONE_THREAD = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}



class ScriptedBackend:
    """Answers from a script: ``reply(conversation, call_index) -> text``; records every call it gets. It takes
    neither per-row seeds nor ``on_batch`` and cannot tell whether a prompt fits, as a minimal backend may."""

    takes_seeds = False
    takes_on_batch = False

    def __init__(self, reply, name: str = "scripted") -> None:
        self.reply = reply
        self.name = name
        self.calls: list[list[list[dict]]] = []

    def generate(self, conversations, sampling: SamplingConfig) -> list[Generation]:
        self.calls.append([list(c) for c in conversations])
        out = []
        for conv in conversations:
            text = self.reply(conv, len(self.calls) - 1)
            out.append(Generation(text, len(str(conv)) // 4, len(text.split()), 0.01))
        return out

    def prompt_fit(self, conversation, max_new_tokens: int):
        return None

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def keep_last_tokens(self, text: str, n: int) -> str:
        return " ".join(text.split()[-n:])

    def close(self) -> None:
        pass


def problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(n)]


def team_of(backend, n_agents: int = 3, **kw) -> tuple[TeamConfig, dict]:
    cfg = TeamConfig(agents=[AgentConfig(name=f"a{i}") for i in range(n_agents)], **kw)
    backends = {backend_key(a): backend for a in [*cfg.agents, *([cfg.judge] if cfg.judge else [])]}
    return cfg, backends


def agent_of(conv) -> str:
    """Which agent a conversation belongs to, from its persona (tests give each agent one)."""
    return conv[0]["content"] if conv[0]["role"] == "system" else "?"


def test_round_structure_and_one_call_per_round():
    be = ScriptedBackend(lambda conv, k: "\\boxed{" + str(1 + k) + "}")
    cfg, backends = team_of(be, 3, rounds=3)
    trajs = debate_step(problems(5), build_team(cfg, backends), run_id="r")
    # 5 problems x 3 agents in each of 3 rounds: one batch call per round, never one per agent.
    assert [len(c) for c in be.calls] == [15, 15, 15]
    t = trajs[0]
    assert [len(r) for r in t.rounds] == [3, 3, 3]
    assert [turn.round for turn in t.rounds[2]] == [2, 2, 2]
    # Round r's conversation: question, then (own answer, peers) for each earlier round.
    conv = be.calls[2][0]
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant", "user"]
    assert conv[1]["content"] == "\\boxed{1}" and conv[3]["content"] == "\\boxed{2}"
    assert t.final_answer == "3" and t.rounds[0][0].answer == "1"
    assert t.cost["tokens_out"] == sum(x.tokens_out for r in t.rounds for x in r)


def test_topologies_choose_peers():
    def reply(conv, k):
        return f"{agent_of(conv)} says \\boxed{{{k}}}"

    def run(topology, judge=None):
        be = ScriptedBackend(reply)
        agents = [AgentConfig(name=f"a{i}", persona=f"a{i}") for i in range(4)]
        cfg = TeamConfig(agents=agents, rounds=2, topology=topology, judge=judge)
        backends = {backend_key(a): be for a in agents + ([judge] if judge else [])}
        t = debate_step(problems(1), build_team(cfg, backends), run_id="r")[0]
        return {turn.agent: turn.meta["peers"] for turn in t.rounds[1]}, t, be

    peers, _, _ = run("all")
    assert peers["a0"] == ["a1", "a2", "a3"] and peers["a2"] == ["a0", "a1", "a3"]
    peers, _, _ = run("ring")
    assert peers == {"a0": ["a3"], "a1": ["a0"], "a2": ["a1"], "a3": ["a2"]}
    peers, _, _ = run("star")
    assert peers == {"a0": ["a1", "a2", "a3"], "a1": ["a0"], "a2": ["a0"], "a3": ["a0"]}
    judge = AgentConfig(name="J", persona="J")
    peers, t, be = run("star", judge)
    assert all(p == ["J"] for p in peers.values())
    # The judge reads all four agents after each round; agents in round 1 see its round-0 summary.
    assert len(t.meta["judge"]) == 2 and t.meta["judge"][0]["meta"]["peers"] == ["a0", "a1", "a2", "a3"]
    assert "J says" in be.calls[2][0][-1]["content"]  # round-1 agents' user turn quotes the judge
    assert t.aggregation == "majority"


def test_majority_tie_break_and_unparsable():
    def turn(agent, ans, correct=False):
        return Turn(agent, 1, "m", "", ans, correct, 0, 0, 0.0)

    last = [turn("a", "5"), turn("b", "7", True), turn("c", None)]
    hist0 = [turn("a", "7"), turn("b", "7"), turn("c", "5")]
    # Tie 5 vs 7 in the last round: 7 has more votes over all rounds.
    assert majority(last, [hist0, last]) == ("7", True, True)
    hist0 = [turn("a", "5"), turn("b", "7"), turn("c", None)]
    # Still tied over all rounds: the lowest-index agent's answer wins.
    assert majority(last, [hist0, last]) == ("5", False, True)
    assert majority([turn("a", None)], [[turn("a", None)]]) == (None, False, False)


def test_majority_counts_equal_numbers_as_one_answer():
    def turn(agent, ans, correct=False):
        return Turn(agent, 1, "m", "", ans, correct, 0, 0, 0.0)

    # 1/2 and 0.5 are the same answer: two votes against one, no tie to break
    last = [turn("a", "3"), turn("b", "1/2", True), turn("c", "0.5", True)]
    assert majority(last, [last]) == ("1/2", True, False)
    last = [turn("a", "Monday"), turn("b", "monday"), turn("c", "7")]
    assert majority(last, [last]) == ("Monday", False, False)


def test_judge_aggregation_and_errors():
    def reply(conv, k):
        return "\\boxed{99}" if agent_of(conv) == "J" else "\\boxed{1}"

    be = ScriptedBackend(reply)
    judge = AgentConfig(name="J", persona="J")
    cfg = TeamConfig(agents=[AgentConfig(name="a"), AgentConfig(name="b")], rounds=2, aggregation="judge",
                     judge=judge)
    t = debate_step(problems(2), build_team(cfg, {backend_key(judge): be}), run_id="r")[0]
    assert t.final_answer == "99" and len(t.meta["judge"]) == 1 and len(be.calls) == 3
    with pytest.raises(PluribusError, match="team.judge is not set"):
        build_team(TeamConfig(aggregation="judge"), {})
    with pytest.raises(PluribusError, match="unique"):
        build_team(TeamConfig(agents=[AgentConfig(name="x"), AgentConfig(name="x")]), {})


def test_peer_trim_recorded():
    long_answer = " ".join(f"w{i}" for i in range(500)) + " \\boxed{3}"
    be = ScriptedBackend(lambda conv, k: long_answer if k == 0 else "\\boxed{3}")
    cfg, backends = team_of(be, 2, rounds=2, peer_token_budget=50)
    t = debate_step(problems(1), build_team(cfg, backends), run_id="r")[0]
    assert t.rounds[1][0].meta["peer_tokens_dropped"] == [501 - 50]
    shown = be.calls[1][0][-1]["content"]
    assert TRIM_MARK + "w451" in shown and "\\boxed{3}" in shown and "w450 " not in shown


def test_unparsable_output_recorded_and_run_goes_on():
    be = ScriptedBackend(lambda conv, k: "" if k == 0 else "I am not sure.")
    cfg, backends = team_of(be, 2, rounds=2)
    t = debate_step(problems(2), build_team(cfg, backends), run_id="r")[0]
    assert all(turn.answer is None and turn.correct is False for r in t.rounds for turn in r)
    assert t.final_answer is None and t.final_correct is False


def test_single_agent_path_and_prompt_templates():
    be = ScriptedBackend(lambda conv, k: "\\boxed{2}")
    cfg, backends = team_of(be, 1, rounds=1, prompts={"question": "Q: {question} Put it in \\boxed{answer}."})
    t = debate_step(problems(2), build_team(cfg, backends), run_id="r")[1]
    assert be.calls[0][1] == [{"role": "user", "content": "Q: What is 1 + 1? Put it in \\boxed{answer}."}]
    assert t.final_correct is True and len(t.rounds) == 1 and len(t.rounds[0]) == 1
    assert fill(DEFAULT_PROMPTS["question"], question="x").endswith("\\boxed{answer}, at the end of your response.")
    with pytest.raises(PluribusError, match="Available: question"):
        resolve_prompts({"qestion": "{question}"})
    with pytest.raises(PluribusError, match="must contain \\{peers\\}"):
        resolve_prompts({"debate": "no peers here"})
    # One agent over several rounds reflects on its own answer (no peers to show).
    cfg, backends = team_of(be, 1, rounds=2)
    debate_step(problems(1), build_team(cfg, backends), run_id="r")
    assert be.calls[-1][0][-1]["content"].startswith("Review your previous answer")


def test_groups_by_backend_and_sampling():
    fast, other = ScriptedBackend(lambda c, k: "\\boxed{1}"), ScriptedBackend(lambda c, k: "\\boxed{1}")
    agents = [AgentConfig(name="a", model="m1"), AgentConfig(name="b", model="m1"),
              AgentConfig(name="c", model="m1", sampling=SamplingConfig(temperature=0.7)),
              AgentConfig(name="d", model="m2")]
    cfg = TeamConfig(agents=agents, rounds=1)
    backends = {backend_key(agents[0]): fast, backend_key(agents[3]): other}
    debate_step(problems(4), build_team(cfg, backends), run_id="r")
    # a and b share model and sampling: one call of 8; c (other sampling) one of 4; d (other model) one of 4.
    assert sorted(len(c) for c in fast.calls) == [4, 8] and [len(c) for c in other.calls] == [4]


def test_run_debate_resumes_and_refuses_changed_config(tmp_path):
    be = ScriptedBackend(lambda conv, k: "\\boxed{2}")
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=6),
                    team=TeamConfig(agents=[AgentConfig(name="a"), AgentConfig(name="b")], rounds=2,
                                    problems_per_step=4))
    backends = {backend_key(recipe.team.agents[0]): be}
    s = run_debate(recipe, problems=problems(6), backends=backends, progress=False)
    assert s.problems == 6 and s.new == 6 and len(be.calls) == 4  # 2 steps x 2 rounds
    assert s.team_accuracy == pytest.approx(1 / 6) and s.round0_accuracy == pytest.approx(1 / 6)
    s = run_debate(recipe, problems=problems(8), backends=backends, progress=False)
    assert s.problems == 8 and s.new == 2
    store = TrajectoryStore(tmp_path / "r" / "trajectories")
    ids = [r["problem_id"] for r in store.iter_records()]
    assert sorted(ids) == sorted(f"p{i}" for i in range(8))
    changed = recipe.model_copy(update={"team": recipe.team.model_copy(update={"rounds": 3})})
    assert config_hash(changed) != config_hash(recipe)
    with pytest.raises(PluribusError, match="--new-run"):
        run_debate(changed, problems=problems(8), backends=backends, progress=False)
    # Batch settings change the hash only where batching changes tokens: 16-bit local agents (bf16 here).
    faster = recipe.model_copy(update={"team": recipe.team.model_copy(update={"batch_size": 7})})
    assert config_hash(faster) != config_hash(recipe)
    fp32 = [a.model_copy(update={"dtype": "float32"}) for a in recipe.team.agents]
    exact = recipe.model_copy(update={"team": recipe.team.model_copy(update={"agents": fp32})})
    for speed in ({"batch_size": 7}, {"problems_per_step": 1}, {"too_long": "skip"}):
        assert config_hash(exact.model_copy(update={"team": exact.team.model_copy(update=speed)})) == \
            config_hash(exact)
    s = run_debate(changed, problems=problems(2), backends=backends, progress=False, new_run=True)
    assert s.problems == 2 and s.new == 2


def test_refused_config_leaves_recipe_and_transport_settings_are_not_hashed(tmp_path):
    be = ScriptedBackend(lambda conv, k: "\\boxed{2}")
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=2),
                    team=TeamConfig(agents=[AgentConfig(name="a"), AgentConfig(name="b")], rounds=2))
    backends = {backend_key(recipe.team.agents[0]): be}
    run_debate(recipe, problems=problems(2), backends=backends, progress=False)
    written = (tmp_path / "r" / "recipe.yaml").read_text()
    changed = recipe.model_copy(update={"team": recipe.team.model_copy(update={"rounds": 3})})
    with pytest.raises(PluribusError, match="--new-run"):
        run_debate(changed, problems=problems(2), backends=backends, progress=False)
    assert (tmp_path / "r" / "recipe.yaml").read_text() == written  # still the recipe of the stored data
    # How an agent reaches its server cannot change its answers.
    moved = [a.model_copy(update={"base_url": "http://other:9/v1", "api_key_env": "K", "max_retries": 0,
                                  "timeout_s": 5.0, "max_concurrency": 1}) for a in recipe.team.agents]
    judged = recipe.team.model_copy(update={"agents": moved, "judge": moved[0]})
    assert config_hash(recipe.model_copy(update={"team": judged})) == config_hash(
        recipe.model_copy(update={"team": recipe.team.model_copy(update={"judge": recipe.team.agents[0]})}))
    other_model = [a.model_copy(update={"model": "m2"}) for a in recipe.team.agents]
    assert config_hash(recipe.model_copy(update={"team": recipe.team.model_copy(update={"agents": other_model})})) \
        != config_hash(recipe)


def test_summary_counts_corrections():
    # agent a: wrong -> right; agent b: right -> wrong.
    def reply(conv, k):
        first = k == 0
        is_a = agent_of(conv) == "A"
        return "\\boxed{" + ("9" if first == is_a else "1") + "}"

    be = ScriptedBackend(reply)
    agents = [AgentConfig(name="a", persona="A"), AgentConfig(name="b", persona="B")]
    cfg = TeamConfig(agents=agents, rounds=2)
    from pluribus.stages.debate import summarize

    trajs = debate_step([Problem("q", "What is 0 + 1?", "1")], build_team(cfg, {backend_key(agents[0]): be}),
                        run_id="r")
    s = summarize([t.to_dict() for t in trajs])
    assert (s.corrected, s.lost, s.round0_accuracy) == (1, 1, 0.5)


# ------------------------------------------------------------------------------ real models, real CLI


def write_recipe(path: Path, root: Path, team: dict, task: dict | None = None, name: str = "t") -> Path:
    data = {"name": name, "root": str(root), "task": task or {"source": "synthetic", "n": 4}, "team": team}
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **ONE_THREAD, **(env or {})})


@pytest.mark.parametrize(
    ("team", "task", "needle"),
    [
        ({"agents": []}, None, "team.agents"),
        ({"rounds": 0}, None, "team.rounds"),
        ({"agents": [{"backend": "tgi"}]}, None, "team.agents.0.backend"),
        ({"agents": [{"model": "no-such-model"}]}, None, "no-such-model"),
        ({"agents": [{"backend": "openai"}]}, None, "base_url"),
        ({}, {"source": "jsonl", "path": "EMPTY"}, "no problems"),
    ],
)
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, team, task, needle):
    if task and task.get("path") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text("")
        task = {**task, "path": str(tmp_path / "empty.jsonl")}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "runs", team, task)
    res = cli("debate", str(recipe), "--no-progress", timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()


def test_tiny_model_debate_cli_and_datasets(tmp_path, tiny_llama_dir):
    agent = {"model": str(tiny_llama_dir), "dtype": "float32", "sampling": {"max_new_tokens": 12}}
    team = {"agents": [agent, {**agent, "sampling": {"max_new_tokens": 12, "temperature": 0.8, "seed": 1}}],
            "rounds": 2, "batch_size": 4}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "runs", team, {"source": "synthetic", "n": 5})
    res = cli("debate", str(recipe), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "team accuracy" in res.stdout and "wrong -> right" in res.stdout
    store_dir = tmp_path / "runs" / "t" / "trajectories"
    records = list(TrajectoryStore(store_dir).iter_records())
    assert len(records) == 5 and all(len(r["rounds"]) == 2 for r in records)
    turn = records[0]["rounds"][1][0]
    assert turn["tokens_out"] <= 12 and turn["meta"]["peers"] == ["agent1"]
    import datasets

    ds = datasets.load_dataset("json", data_files=str(store_dir / "shard-*.jsonl"), split="train")
    assert ds.num_rows == 5 and ds[0]["rounds"][1][0]["agent"] == "agent0"
    # Rerun: nothing new, same store.
    res = cli("debate", str(recipe), "--no-progress", timeout=300)
    assert res.returncode == 0 and "5 (0)" in res.stdout
    # A changed config is refused with the way out named.
    res = cli("debate", str(recipe), "team.rounds=3", "--no-progress", timeout=300)
    assert res.returncode == 2 and "--new-run" in res.stderr


def test_single_agent_with_lora_adapter(tmp_path, tiny_llama_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"],
                                                 init_lora_weights=False, lora_alpha=64))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)

    def run(name: str, adapter_dir: str | None):
        agent = AgentConfig(model=str(tiny_llama_dir), adapter=adapter_dir, dtype="float32",
                            sampling=SamplingConfig(max_new_tokens=8))
        recipe = Recipe(name=name, root=str(tmp_path), task=TaskConfig(n=3),
                        team=TeamConfig(agents=[agent], rounds=1))
        run_debate(recipe, progress=False)
        return list(TrajectoryStore(tmp_path / name / "trajectories").iter_records())

    with_adapter, without = run("lora", str(adapter)), run("base", None)
    assert len(with_adapter) == 3 and len(with_adapter[0]["rounds"]) == 1 and len(with_adapter[0]["team"]) == 1
    assert with_adapter[0]["rounds"][0][0]["model"].endswith("+" + str(adapter))
    assert [r["rounds"][0][0]["response"] for r in with_adapter] != [r["rounds"][0][0]["response"] for r in without]


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_stores_each_problem_once(tmp_path, tiny_llama_dir):
    agent = {"model": str(tiny_llama_dir), "dtype": "float32", "sampling": {"max_new_tokens": 24}}
    team = {"agents": [agent, agent], "rounds": 2, "batch_size": 2, "problems_per_step": 1}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "runs", team, {"source": "synthetic", "n": 10})
    store_dir = tmp_path / "runs" / "t" / "trajectories"
    proc = subprocess.Popen([sys.executable, "-m", "pluribus.cli", "debate", str(recipe), "--no-progress"],
                            cwd=REPO, env={**os.environ, **ONE_THREAD},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        shard = store_dir / "shard-00000.jsonl"
        if shard.exists() and shard.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = (store_dir / "shard-00000.jsonl").read_bytes().count(b"\n")
    assert 2 <= partial < 10, "the run should be killed mid-way"
    res = cli("debate", str(recipe), "--no-progress", timeout=300)
    assert res.returncode == 0, res.stderr
    ids = []
    for shard in sorted(store_dir.glob("shard-*.jsonl")):
        data = shard.read_bytes()
        assert data.endswith(b"\n")
        ids += [json.loads(line)["problem_id"] for line in data.splitlines()]
    assert len(ids) == 10 and len(set(ids)) == 10


@pytest.mark.integration
def test_embedded_model_small_debate(tmp_path):
    recipe = load_recipe(None, [f"root={tmp_path}", "name=emb", "task.n=2", "team.rounds=2",
                                "team.agents=[{sampling: {max_new_tokens: 24}}, {sampling: {max_new_tokens: 24}}]"])
    s = run_debate(recipe, progress=False)
    assert s.problems == 2 and s.tokens_per_problem > 0
    records = list(TrajectoryStore(tmp_path / "emb" / "trajectories").iter_records())
    responses = [t["response"] for r in records for rnd in r["rounds"] for t in rnd]
    assert len(responses) == 8 and all(isinstance(x, str) for x in responses) and any(responses)


def _store_lines(tmp_path):
    shard = tmp_path / "r" / "trajectories" / "shard-00000.jsonl"
    return shard, shard.read_bytes().splitlines(keepends=True)


def test_a_store_line_with_no_rounds_is_corrupt_and_repair_resumes(tmp_path, monkeypatch, capsys):
    from pluribus import cli

    be = ScriptedBackend(lambda conv, k: "\\boxed{2}")
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=3),
                    team=TeamConfig(agents=[AgentConfig(name="a")], rounds=1))
    backends = {backend_key(recipe.team.agents[0]): be}
    run_debate(recipe, problems=problems(3), backends=backends, progress=False)
    shard, lines = _store_lines(tmp_path)
    hollow = json.loads(lines[1])
    hollow["rounds"] = []  # valid JSON, not a trajectory
    shard.write_bytes(lines[0] + json.dumps(hollow).encode() + b"\n" + lines[2])
    with pytest.raises(PluribusError, match=r"line 2 is corrupt \(Trajectory field 'rounds' is empty.*\); "
                                            r"run `pluribus repair "):
        run_debate(recipe, problems=problems(3), backends=backends, progress=False)
    monkeypatch.setattr(sys, "argv", ["pluribus", "repair", str(tmp_path / "r")])
    cli.main()  # the command the message names
    assert "1 corrupt line(s): shard-00000.jsonl:2" in capsys.readouterr().out
    s = run_debate(recipe, problems=problems(3), backends=backends, progress=False)
    assert s.problems == 3 and s.new == 1  # p1 generated again


def test_a_duplicated_store_line_is_counted_once_and_reported(tmp_path):
    be = ScriptedBackend(lambda conv, k: "\\boxed{2}")
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=2),
                    team=TeamConfig(agents=[AgentConfig(name="a")], rounds=1))
    backends = {backend_key(recipe.team.agents[0]): be}
    run_debate(recipe, problems=problems(2), backends=backends, progress=False)
    shard, lines = _store_lines(tmp_path)
    shard.write_bytes(lines[0] + lines[1] + lines[1])
    s = run_debate(recipe, problems=problems(2), backends=backends, progress=False)
    assert s.problems == 2 and s.team_accuracy == pytest.approx(0.5)  # p1 (gold 2) counted once
    assert s.duplicates == ("shard-00000.jsonl:3",)
    assert ("duplicated store lines (counted once)", "1: shard-00000.jsonl:3 (pluribus repair removes them)") \
        in s.rows()


def _record_bar(monkeypatch) -> list[tuple[float, int]]:
    """(completed generations, stored problems) of the live bar after every finished batch."""
    from pluribus.stages import debate

    seen: list[tuple[float, int]] = []
    original = debate._Progress.batch

    def batch(self, gens):
        original(self, gens)
        task = self.bar.tasks[0]
        seen.append((task.completed, task.fields["stored"]))

    monkeypatch.setattr(debate._Progress, "batch", batch)
    return seen


def test_the_bar_moves_with_each_generated_batch_inside_a_step(tmp_path, monkeypatch):
    seen = _record_bar(monkeypatch)
    be = ScriptedBackend(lambda conv, k: "\\boxed{2}")
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=3),
                    team=TeamConfig(agents=[AgentConfig(name="a"), AgentConfig(name="b")], rounds=2,
                                    problems_per_step=3))
    run_debate(recipe, problems=problems(3), backends={backend_key(recipe.team.agents[0]): be}, progress=True)
    # one step of 3 problems x 2 agents x 2 rounds: the bar moves after each round, before anything is stored
    assert seen == [(6, 0), (12, 0)]


def test_the_bar_follows_the_transformers_backends_micro_batches(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    from pluribus.data.backends import TransformersBackend

    seen = _record_bar(monkeypatch)
    agent = AgentConfig(name="a", model=str(tiny_llama_dir), dtype="float32",
                        sampling=SamplingConfig(max_new_tokens=4))
    backend = TransformersBackend(agent, batch_size=2)
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=3),
                    team=TeamConfig(agents=[agent], rounds=1, problems_per_step=3, batch_size=2))
    run_debate(recipe, problems=problems(3), backends={backend_key(agent): backend}, progress=True,
               label="single-greedy")
    assert seen == [(2, 0), (3, 0)] and backend.calls == 1  # 2 slots: two rows end, then the third
    err = capsys.readouterr().err
    assert "single-greedy" in err and "3/3 problems" in err and "debate" not in err  # eval names its systems


def test_early_stop_skips_the_rounds_of_problems_whose_agents_agree():
    # p0's agents agree in round 0 (all say 1); p1's disagree (9, 2, 2), then agree on 2 in round 1
    rows = iter(range(10_000))  # the call's rows come problem by problem, agent by agent: p1's a0 is row 3

    def reply(conv, k):
        row = next(rows)
        if "What is 0 + 1" in conv[0]["content"]:
            return "\\boxed{1}"
        return "\\boxed{9}" if (k, row) == (0, 3) else "\\boxed{2}"

    be = ScriptedBackend(reply)
    cfg, backends = team_of(be, 3, rounds=3, early_stop=True)
    t0, t1 = debate_step(problems(2), build_team(cfg, backends), run_id="r")
    assert len(t0.rounds) == 1 and t0.meta["stopped_after_round"] == 0 and t0.final_answer == "1"
    assert len(t1.rounds) == 2 and t1.meta["stopped_after_round"] == 1  # agreed on 2 in round 1
    assert [len(call) for call in be.calls] == [6, 3]  # round 1 for p1 only, no round 2 at all
    # off by default: every round runs for every problem, and nothing is recorded
    be.calls.clear()
    cfg, backends = team_of(be, 3, rounds=3)
    t0, _ = debate_step(problems(2), build_team(cfg, backends), run_id="r")
    assert len(t0.rounds) == 3 and "stopped_after_round" not in t0.meta and len(be.calls) == 3


def test_early_stop_needs_every_agent_to_give_the_same_parsed_answer():
    from pluribus.data.debate import agreed

    assert agreed(["3", "3", "3"]) and agreed(["0.5", "1/2"])  # equal numbers written two ways
    assert not agreed(["3", "3", None]) and not agreed(["3", "4"]) and not agreed(["3"])


class FittingBackend(ScriptedBackend):
    """A scripted backend with a context of ``context`` words (a prompt's size: the words of its messages)."""

    def __init__(self, reply, context: int) -> None:
        super().__init__(reply)
        self.context = context

    def prompt_fit(self, conv, max_new_tokens):
        from pluribus.data.backends import Fit

        words = sum(len(m["content"].split()) for m in conv)
        return Fit(words, self.context - max_new_tokens, self.context, max_new_tokens)


def long_problems() -> list[Problem]:
    return [*problems(3), Problem(id="long", question="Why " * 300 + "is 1 + 1?", answer="2")]


def test_a_question_past_the_context_is_refused_up_front_never_cut(tmp_path, tiny_llama_dir):
    agent = AgentConfig(model=str(tiny_llama_dir), dtype="float32", context_length=128, persona="You are careful.",
                        sampling=SamplingConfig(max_new_tokens=16))
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=4), team=TeamConfig(agents=[agent], rounds=1))
    with pytest.raises(PluribusError, match=r"problem 'long' does not fit agent 'agent0' in round 0: its prompt is "
                                            r"\d+ tokens, and the context of 128 leaves 112 .*team.too_long=skip"):
        run_debate(recipe, problems=long_problems(), progress=False)
    assert not (tmp_path / "r").exists()  # refused before the first file
    skip = recipe.model_copy(update={"team": recipe.team.model_copy(update={"too_long": "skip"})})
    s = run_debate(skip, problems=long_problems(), progress=False)
    assert s.problems == 3 and s.new == 3 and len(s.skipped) == 1 and "problem 'long'" in s.skipped[0]
    assert any("skipped: prompt too long" in k and v.startswith("1: problem 'long'") for k, v in s.rows())
    stored = list(TrajectoryStore(tmp_path / "r" / "trajectories").iter_records())
    assert sorted(r["problem_id"] for r in stored) == ["p0", "p1", "p2"]
    assert config_hash(skip) == config_hash(recipe)  # the setting stores nothing different


def test_a_debate_round_that_does_not_fit_follows_the_same_rule(tmp_path):
    # round 0 fits every problem; in round 1, p0's peers' long replies push its prompt past 120 - 8 words
    be = FittingBackend(lambda conv, k: "long " * 20 + "\\boxed{1}" if "What is 0 + 1" in conv[0]["content"]
                        else "\\boxed{3}", context=120)
    agents = [AgentConfig(name=n, sampling=SamplingConfig(max_new_tokens=8)) for n in ("a", "b")]
    team = TeamConfig(agents=agents, rounds=2)
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=3), team=team)
    backends = {backend_key(agents[0]): be}
    with pytest.raises(PluribusError, match="problem 'p0' does not fit agent 'a' in round 1: its prompt is"):
        run_debate(recipe, problems=problems(3), backends=backends, progress=False)
    skip = recipe.model_copy(update={"name": "s", "team": team.model_copy(update={"too_long": "skip"})})
    s = run_debate(skip, problems=problems(3), backends=backends, progress=False)
    assert s.problems == 2 and s.new == 2 and len(s.skipped) == 1 and "problem 'p0'" in s.skipped[0]
    stored = list(TrajectoryStore(tmp_path / "s" / "trajectories").iter_records())
    assert sorted(r["problem_id"] for r in stored) == ["p1", "p2"] and all(len(r["rounds"]) == 2 for r in stored)


def test_a_bf16_store_is_not_continued_with_other_batches_but_older_stores_are_taken_over(tmp_path):
    from pluribus.stages.debate import _CURRENT_EXCLUDE, _hash

    be = ScriptedBackend(lambda conv, k: "\\boxed{2}")
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=4),
                    team=TeamConfig(agents=[AgentConfig(name="a"), AgentConfig(name="b")], rounds=1,
                                    problems_per_step=2))
    backends = {backend_key(recipe.team.agents[0]): be}
    run_debate(recipe, problems=problems(2), backends=backends, progress=False)
    other = recipe.model_copy(update={"team": recipe.team.model_copy(update={"problems_per_step": 3})})
    with pytest.raises(PluribusError, match="--new-run"):
        run_debate(other, problems=problems(4), backends=backends, progress=False)
    # a store written before batch settings were hashed resumes, and takes the new hash
    manifest = tmp_path / "r" / "trajectories" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "config_hash": _hash(other, _CURRENT_EXCLUDE)}))
    assert run_debate(other, problems=problems(4), backends=backends, progress=False).new == 2
    assert json.loads(manifest.read_text())["config_hash"] == config_hash(other)


@pytest.mark.parametrize(("label", "agents", "rounds", "shown", "not_shown"), [
    ("debate", 2, 2, "team 50.0%  round-0 50.0%", "per sample"),
    ("team", 2, 2, "team 50.0%  round-0 50.0%", "per sample"),
    ("single-greedy", 1, 1, "single-greedy 50.0%", "team"),
    ("merged-greedy", 1, 1, "merged-greedy 50.0%", "round-0"),
    ("sc (k=3)", 3, 1, "sc (k=3) per sample 50.0%", "team"),
])
def test_the_progress_bar_names_the_accuracy_by_its_system(tmp_path, capsys, label, agents, rounds, shown, not_shown):
    """eval runs every system through the debate's bar: a single agent's running accuracy is not the "team"'s."""
    be = ScriptedBackend(lambda conv, k: "\\boxed{1}")  # right on p0 only (p1's answer is 2)
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=2),
                    team=TeamConfig(agents=[AgentConfig(name=f"a{i}") for i in range(agents)], rounds=rounds))
    run_debate(recipe, problems=problems(2), backends={backend_key(recipe.team.agents[0]): be}, progress=True,
               label=label)
    err = capsys.readouterr().err
    assert shown in err and not_shown not in err.replace(label, ""), err
