"""One seed, one result: batching, problem order, resume and a torn step never change a sampled turn."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pluribus.config import AgentConfig, Recipe, SamplingConfig, TaskConfig, TeamConfig
from pluribus.data.backends import TransformersBackend, backend_key
from pluribus.data.store import SHARD_GLOB, TrajectoryStore
from pluribus.data.tasks import load_problems
from pluribus.stages.debate import run_debate

REPO = Path(__file__).resolve().parents[2]
ONE_THREAD = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
N = 6


def digest(store_dir: Path) -> str:
    """What the store holds, in problem order, without what may differ between equal runs: timings, run ids."""
    records = sorted(TrajectoryStore(store_dir).iter_records(), key=lambda r: r["problem_id"])
    for r in records:
        r.pop("run_id")
        r["cost"].pop("seconds")
        for turn in [t for rnd in r["rounds"] for t in rnd]:
            turn.pop("seconds")
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def team_dict(model: Path, **kw) -> dict:
    agent = {"model": str(model), "dtype": "float32",
             "sampling": {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9}}
    return {"agents": [agent, {**agent, "name": "b"}], "rounds": 2, "batch_size": 4, **kw}


def recipe_of(root: Path, model: Path, name: str, **team) -> Recipe:
    return Recipe(name=name, root=str(root), seed=3, task=TaskConfig(source="synthetic", n=N),
                  team=TeamConfig(**team_dict(model, **team)))


@pytest.fixture(scope="module")
def backends(tiny_llama_dir):
    agent = AgentConfig(model=str(tiny_llama_dir), dtype="float32")
    return {backend_key(agent): TransformersBackend(agent, batch_size=4)}


def test_problems_per_step_and_batch_size_do_not_change_sampled_turns(tmp_path, tiny_llama_dir, backends):
    digests = {}
    for name, team in {"one": {"problems_per_step": 1}, "three": {"problems_per_step": 3},
                       "default": {}, "wide": {"batch_size": 12}}.items():
        recipe = recipe_of(tmp_path, tiny_llama_dir, name, **team)
        backend = next(iter(backends.values()))
        backend.batch_size = recipe.team.batch_size
        run_debate(recipe, backends=backends, progress=False)
        digests[name] = digest(tmp_path / name / "trajectories")
    backend.batch_size = 4
    assert len(set(digests.values())) == 1, digests
    # the turns are sampled (a greedy run would agree for another reason): the two agents differ somewhere
    records = list(TrajectoryStore(tmp_path / "one" / "trajectories").iter_records())
    assert any(r["rounds"][0][0]["response"] != r["rounds"][0][1]["response"] for r in records)


def test_problem_order_and_a_torn_step_do_not_change_sampled_turns(tmp_path, tiny_llama_dir, backends):
    problems = load_problems(TaskConfig(source="synthetic", n=N))
    whole = recipe_of(tmp_path, tiny_llama_dir, "whole", problems_per_step=3)
    run_debate(whole, problems=problems, backends=backends, progress=False)
    reversed_ = recipe_of(tmp_path, tiny_llama_dir, "reversed", problems_per_step=3)
    run_debate(reversed_, problems=problems[::-1], backends=backends, progress=False)
    assert digest(tmp_path / "reversed" / "trajectories") == digest(tmp_path / "whole" / "trajectories")
    # a crash stored the first step and one line of the second: the rerun debates the other two without it
    torn = tmp_path / "torn" / "trajectories"
    shutil.copytree(tmp_path / "whole" / "trajectories", torn)
    shard = sorted(torn.glob(SHARD_GLOB))[0]
    shard.write_bytes(b"".join(shard.read_bytes().splitlines(keepends=True)[:4]))
    s = run_debate(recipe_of(tmp_path, tiny_llama_dir, "torn", problems_per_step=3), problems=problems,
                   backends=backends, progress=False)
    assert s.new == 2
    assert digest(torn) == digest(tmp_path / "whole" / "trajectories")


def test_seeds_other_than_the_recipes_change_sampled_turns(tmp_path, tiny_llama_dir, backends):
    a = recipe_of(tmp_path, tiny_llama_dir, "a")
    run_debate(a, backends=backends, progress=False)
    b = a.model_copy(update={"name": "b", "seed": 4})
    run_debate(b, backends=backends, progress=False)
    assert digest(tmp_path / "a" / "trajectories") != digest(tmp_path / "b" / "trajectories")


def test_agents_differing_only_in_seed_share_one_call_and_draw_as_their_own(tmp_path, tiny_llama_dir):
    # the single agent's k samples (self samples, self-consistency) are agents with their own seeds: one call
    # serves them (full batches, one prefill per prompt), and each row still draws from its agent's seed
    def team(*seeds: int) -> dict:
        agent = {"model": str(tiny_llama_dir), "dtype": "float32",
                 "sampling": {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9}}
        return {"agents": [{**agent, "name": f"s{s}", "sampling": {**agent["sampling"], "seed": s}} for s in seeds],
                "rounds": 1, "batch_size": 8}

    agent = AgentConfig(model=str(tiny_llama_dir), dtype="float32")
    backend = TransformersBackend(agent, batch_size=8)
    one = {backend_key(agent): backend}
    both = Recipe(name="both", root=str(tmp_path), seed=3, task=TaskConfig(source="synthetic", n=4),
                  team=TeamConfig(**team(5, 6)))
    run_debate(both, backends=one, progress=False)
    assert backend.calls == 1  # 4 problems x 2 agents in one batch of 8, not two calls of 4
    turns = {}
    for s in (5, 6):
        alone = both.model_copy(update={"name": f"alone{s}", "team": TeamConfig(**team(s))})
        run_debate(alone, backends=one, progress=False)
        for r in TrajectoryStore(tmp_path / f"alone{s}" / "trajectories").iter_records():
            turns[r["problem_id"], f"s{s}"] = r["rounds"][0][0]["response"]
    together = {(r["problem_id"], t["agent"]): t["response"]
                for r in TrajectoryStore(tmp_path / "both" / "trajectories").iter_records() for t in r["rounds"][0]}
    assert together == turns and len(set(together.values())) > 2


def test_a_row_samples_alike_alone_and_in_a_batch(backends):
    backend = next(iter(backends.values()))
    convs = [[{"role": "user", "content": f"Count to {i} please" + " and more" * i}] for i in range(5)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    together = backend.generate(convs, sampling, seeds=[11, 12, 13, 14, 15])
    alone = backend.generate(convs[3:4], sampling, seeds=[14])
    assert alone[0].text == together[3].text
    assert len({g.text for g in together}) > 1


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_gives_the_uninterrupted_turns(tmp_path, tiny_llama_dir):
    def write(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "root": str(tmp_path / "runs"), "seed": 3,
                                        "task": {"source": "synthetic", "n": 9},
                                        "team": team_dict(tiny_llama_dir, problems_per_step=3, batch_size=2)}))
        return path

    def cli(recipe: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pluribus.cli", "debate", str(recipe), "--no-progress"],
                              capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **ONE_THREAD})

    assert cli(write("straight")).returncode == 0
    recipe = write("killed")
    store = tmp_path / "runs" / "killed" / "trajectories"
    proc = subprocess.Popen([sys.executable, "-m", "pluribus.cli", "debate", str(recipe), "--no-progress"],
                            cwd=REPO, env={**os.environ, **ONE_THREAD},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        shard = store / "shard-00000.jsonl"
        if shard.exists() and shard.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (store / "shard-00000.jsonl").read_bytes().count(b"\n") < 9, "the run should be killed mid-way"
    res = cli(recipe)
    assert res.returncode == 0, res.stderr
    assert digest(store) == digest(tmp_path / "runs" / "straight" / "trajectories")
