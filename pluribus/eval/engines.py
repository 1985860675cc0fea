"""The vLLM engines of one eval, shared by every system on the same base model (adapters as LoRA requests)."""

from __future__ import annotations

from typing import Any

from pluribus.config import TeamConfig
from pluribus.eval.planning import Plan


class EnginePool:
    """The vLLM engines of one eval: one per base model, started on first use and shared by every system on it
    (the single agent, the team's agents, sc, each expert and adapter merge as a LoRA request), closed when the
    eval ends. An engine start costs half a minute to minutes on CPU, and an eval has a dozen systems."""

    def __init__(self, plans: list[Plan], *, trust_remote_code: bool) -> None:
        from pluribus.data.vllm_engine import adapter_rank

        agents = [a for p in plans if self.serves(p.team) for a in self._agents(p.team)]
        ranks = [adapter_rank(a.adapter) for a in agents if a.adapter]
        self.rank = max(ranks) if ranks else None  # one LoRA rank that holds every adapter the eval asks for
        self.bases = {self._key(a) for a in agents}  # engines at once: they share a GPU's memory evenly
        self.trust_remote_code = trust_remote_code
        self.engines: dict[tuple, Any] = {}
        self.lora_ids: dict[str, int] = {}

    @staticmethod
    def _agents(team: TeamConfig) -> list[Any]:
        return [*team.agents, *([team.judge] if team.judge else [])]

    @staticmethod
    def _key(agent: Any) -> tuple:
        from pluribus.data.backends import backend_key

        return backend_key(agent.model_copy(update={"adapter": None}))

    def serves(self, team: TeamConfig) -> bool:
        """Whether every agent of ``team`` runs on in-process vLLM (a mixed team builds its own backends)."""
        return all(a.backend == "vllm" for a in self._agents(team))

    def backends(self, team: TeamConfig) -> dict[tuple, Any]:
        """The team's backends, keyed as the debate keys them: views of the pool's engines."""
        from pluribus.data.backends import VLLMBackend, backend_key
        from pluribus.data.vllm_engine import GPU_MEMORY_SHARE

        out = {}
        for a in self._agents(team):
            key = self._key(a)
            if key not in self.engines:
                self.engines[key] = VLLMBackend(a.model_copy(update={"adapter": None}),
                                                trust_remote_code=self.trust_remote_code, lora_rank=self.rank,
                                                gpu_share=GPU_MEMORY_SHARE / max(1, len(self.bases)))
            lora_id = self.lora_ids.setdefault(str(a.adapter), len(self.lora_ids) + 1) if a.adapter else 0
            out[backend_key(a)] = self.engines[key].with_adapter(a.adapter, lora_id)
        return out

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
