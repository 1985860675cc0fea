"""Rollouts are seeded by what they are (trace, step, sample): batching and resuming draw the same ones."""

from __future__ import annotations

from pluribus.config import AgentConfig, SamplingConfig
from pluribus.data.backends import TransformersBackend
from pluribus.data.builders.datasets import BackendCompleter
from pluribus.data.builders.process import RolloutRequest
from pluribus.data.records import Problem


def test_a_rollout_draws_alike_in_any_call(tiny_llama_dir):
    agent = AgentConfig(model=str(tiny_llama_dir), dtype="float32",
                        sampling=SamplingConfig(temperature=1.0, max_new_tokens=8))
    backend = TransformersBackend(agent, batch_size=4)
    problem = Problem(id="p", question="What is 2 + 3?", answer="5")
    requests = [RolloutRequest(f"p/a/r{k % 2}", k // 2, k % 3, problem, "2 + 3") for k in range(6)]
    together = BackendCompleter(backend, agent, "{question}", seed=1)(requests)
    split = BackendCompleter(backend, agent, "{question}", seed=1)
    apart = split(requests[3:]) + split(requests[:3])  # a resumed build asks in another order
    assert apart[3:] + apart[:3] == together
    assert len(set(together)) > 1
