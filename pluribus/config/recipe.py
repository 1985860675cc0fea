"""The whole recipe: every section together, and the names that must resolve across sections (experts, merges, seats)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from pluribus.config.agents import AgentConfig
from pluribus.config.base import Section, _device, _folder_name
from pluribus.config.build import BuildConfig
from pluribus.config.eval import SYSTEMS, EvalConfig
from pluribus.config.export import ExportConfig
from pluribus.config.generations import GenerationsConfig
from pluribus.config.merge import MergeConfig
from pluribus.config.task import TaskConfig
from pluribus.config.team import TeamConfig
from pluribus.config.train import TrainConfig
from pluribus.errors import RecipeError
from pluribus.layout import RunLayout


class Recipe(Section):
    """A whole run. ``runs/<name>/`` under ``root`` is where every stage reads and writes."""

    name: str = Field("quickstart", description="Run name (folder under root).")
    root: str = Field("runs", description="Folder holding run folders.")
    seed: int = Field(0, description="Seed of every draw of the run that has no seed of its own: the agents' "
                      "sampling, the self samples, training (data order, LoRA init, RL's samples), sc's samples. "
                      "Part of every step's fingerprint: another seed reruns every step.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python code.")
    threads: int | None = Field(
        None, ge=1, description="CPU threads of torch in every stage (CLI --threads). None: $OMP_NUM_THREADS if "
        "set, else 1 without a GPU (torch's default on a GPU machine): torch's one spinning thread per core "
        "collapses when other jobs share the cores (2 tok/s against 42-58 with one thread on a busy 2-core "
        "box). On a dedicated CPU machine set the cores you can spare. Speed only: no result depends on it.")
    device: str = Field(
        "auto", description="Where every model runs unless a part names its own (agents, judge, build.completer, "
        "train.rl.prm_device, eval.device): auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, "
        "cuda:N; CLI --device. A device this machine lacks is refused. bf16 where the device computes it natively, "
        "else float32; each stage's record says where it ran.")
    task: TaskConfig | None = Field(None, description="Where problems come from (see TaskConfig); None: no debate "
                                    "or eval of the recipe's own problems.")
    team: TeamConfig | None = Field(None, description="The debating team (see TeamConfig); None: no debate.")
    build: BuildConfig | None = Field(None, description="The datasets built from the team's debate (see "
                                      "BuildConfig); None: no build.")
    train: TrainConfig | None = Field(None, description="The experts trained on those datasets (see TrainConfig); "
                                      "None: no training.")
    merge: MergeConfig | None = Field(None, description="The merges of the experts or of merge configs (see "
                                      "MergeConfig); None: no merge.")
    eval: EvalConfig | None = Field(None, description="Every system side by side on held-out problems (see "
                                    "EvalConfig); None: no eval.")
    export: ExportConfig | None = Field(None, description="The Hub-ready folder of the distilled adapter or merged "
                                        "model (see ExportConfig); None: no export.")
    generations: GenerationsConfig | None = Field(
        None, description="Debate, train, evolve for several generations (see GenerationsConfig); None: one.")
    # Set only on generation g >= 2's own recipe (pluribus.generations.generation_recipe): the recipe of generation
    # g-1, whose experts and merges this team's seats name, and the agent whose samples make its self baseline.
    _previous: Recipe | None = PrivateAttr(None)
    _self_agent: AgentConfig | None = PrivateAttr(None)

    _name_is_a_folder = field_validator("name")(_folder_name)
    _device_valid = field_validator("device")(_device)

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("root must be a folder path")
        return v

    @model_validator(mode="after")
    def _names_resolve(self) -> Recipe:
        experts = [t.expert_name for t in self.train.trainings()] if self.train else []
        merges = [m.name for m in self.merge.all()] if self.merge else []
        prms = [t.expert_name for t in self.train.trainings() if t.objective == "prm"] if self.train else []
        for m in self.merge.all() if self.merge else []:
            unknown = [e for e in m.experts or [] if e not in experts]
            if unknown:
                raise ValueError(f"merge '{m.name}' names experts {unknown} that the train section does not have "
                                 f"(experts: {', '.join(experts) or 'none'})")
            if any(e in prms for e in m.experts or []):
                raise ValueError(f"merge '{m.name}' names the process reward model(s) {[e for e in m.experts or [] if e in prms]}, "
                                 "whose score head is no policy; merge the experts that answer")
        clash = sorted(set(experts) & set(merges))
        builtin = ("sc", "team", "prm-bon", "team-prm", "member-sc", "member-prm-bon")
        reserved = sorted(n for n in [*experts, *merges] if n in builtin or n.startswith("single"))
        if clash or reserved:
            raise ValueError(f"names {clash or reserved} are used twice in eval's systems (an expert and a merge, "
                             f"or a built-in system: single, {', '.join(builtin)}); rename them")
        for where, name in (("team.verifier", self.team.verifier if self.team else None),
                            ("eval.verifier", self.eval.verifier if self.eval else None)):
            if name in experts and name not in prms:
                raise ValueError(f"{where} '{name}' is a {self.train.expert(name).objective} expert, not a process "
                                 f"reward model; name a prm expert ({', '.join(prms) or 'none'}) or a PRM adapter "
                                 "folder")
        if self.eval is not None and self.eval.systems is not None:
            unknown = [s for s in self.eval.systems if s not in (*SYSTEMS, *experts, *merges)]
            if unknown:
                raise ValueError(f"eval.systems {unknown} are not systems; use {', '.join(SYSTEMS)}, an expert "
                                 f"({', '.join(experts) or 'none'}) or a merge ({', '.join(merges) or 'none'})")
        return self

    @model_validator(mode="after")
    def _member_is_a_seat(self) -> Recipe:
        member = self.eval.member if self.eval is not None else None
        if member is None:
            return self
        seats = self.team.seat_names() if self.team is not None else []
        if member not in seats:
            raise ValueError(f"eval.member '{member}' is not a seat of the team; use one of: "
                             f"{', '.join(seats) or 'none (the recipe has no team section)'}")
        asked = self.eval.systems
        if asked is not None and not {"member-sc", "member-prm-bon"} & set(asked):
            raise ValueError("eval.member chooses member-sc's seat, and eval.systems has no member-sc; add it, or "
                             "remove eval.member")
        return self

    @model_validator(mode="after")
    def _seats_resolve(self) -> Recipe:
        problem = seat_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _eval_device_has_effect(self) -> Recipe:
        first = self.team.agents[0] if self.team else AgentConfig()
        if self.eval is not None and self.eval.device is not None and first.backend != "transformers":
            raise ValueError(f"eval.device places the single-agent systems, which run on the first agent's backend, "
                             f"{first.backend}, which places its own models; remove eval.device")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def require(self, section: str) -> Any:
        """The named section, or a RecipeError telling the user to add it."""
        value = getattr(self, section)
        if value is None:
            raise RecipeError(f"recipe has no '{section}' section; add one (see configs/quickstart.yaml)")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections, for manifests that must refuse a changed config."""
        payload = {s: getattr(self, s).model_dump(mode="json") if getattr(self, s) else None for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ seats


def seatable(recipe: Recipe) -> dict[str, str]:
    """The names a team seat may take in ``recipe``: each expert but PRMs (-> "expert") and each merge of named
    experts (-> "merge")."""
    out = {t.expert_name: "expert" for t in recipe.train.trainings() if t.objective != "prm"} if recipe.train else {}
    out.update({m.name: "merge" for m in recipe.merge.all() if m.experts is not None} if recipe.merge else {})
    return out


def seat_base_model(recipe: Recipe, name: str) -> str:
    """The base model of seat ``name`` (a name ``seatable`` gives): the expert's ``model``, or for a merge its first
    expert's (a merge of adapters checks that they share one)."""
    train = recipe.train
    merges = {m.name: m for m in recipe.merge.all()} if recipe.merge else {}
    expert = merges[name].experts[0] if name in merges else name  # type: ignore[index]
    return train.expert(expert).model  # type: ignore[union-attr]


def seat_problem(recipe: Recipe) -> str | None:
    """What is wrong with the seats of ``recipe``'s team (and its judge) and of ``generations.seats``, or None.

    A seat names an expert (not a PRM: its score head answers nothing) or a merge of named experts. Within one
    generation a seat may not depend on this team's debate: with a build section every expert trains on data
    built from it (the self baseline's rows are matched to the team's), so a seat there is a cycle."""
    wrong = _seat_check(recipe)
    return _team_seat_problem(recipe, wrong) or _generation_seat_problem(recipe, wrong)


def _seat_check(recipe: Recipe) -> Callable[..., str | None]:
    """``wrong(where, name, base_ok=False)``: what is wrong with seating ``name`` at ``where``, or None."""
    names = seatable(recipe)
    prms = {t.expert_name for t in recipe.train.trainings() if t.objective == "prm"} if recipe.train else set()
    other_merges = {m.name for m in recipe.merge.all() if m.experts is None} if recipe.merge else set()
    valid = ", ".join(names) or "none: the recipe trains no expert and merges none"

    def wrong(where: str, name: str, base_ok: bool = False) -> str | None:
        if name in prms:
            return (f"{where} '{name}' is a process reward model, whose score head answers nothing; seat an "
                    f"expert that answers ({valid})")
        if name in other_merges:
            return (f"{where} '{name}' is a merge of a config file or inline spec, whose base is not known "
                    "before it runs; seat its folder instead (model: or adapter: <run>/merged/" + name + ")")
        if name not in names and not (base_ok and name == "base"):
            return f"{where} '{name}' is not an expert or merge of this run; use one of: {valid}" + (
                ", or base" if base_ok else "")
        return None

    return wrong


def _team_seat_problem(recipe: Recipe, wrong: Callable[..., str | None]) -> str | None:
    """The first problem with the completer's, the team agents' and the judge's ``expert:`` seats."""
    completer = recipe.build.completer if recipe.build else None
    if completer is not None and completer.expert is not None:
        return (f"build.completer.expert '{completer.expert}': only team agents and the judge seat an expert; give "
                "the completer model (and adapter) instead")
    team = recipe.team
    seated = [(f"team.agents.{i}.expert", a.expert) for i, a in enumerate(team.agents if team else [])
              if a.expert is not None]
    if team is not None and team.judge is not None and team.judge.expert is not None:
        seated.append(("team.judge.expert", team.judge.expert))
    agents = [*(team.agents if team else []), *([team.judge] if team and team.judge else [])]
    for (where, name), agent in zip(seated, [a for a in agents if a.expert is not None], strict=True):
        if (problem := wrong(where, name)) is not None:
            return problem
        base = seat_base_model(recipe, name)
        # the default is what a written recipe.yaml spells out for a seat that named no model
        if "model" in agent.model_fields_set and agent.model not in (base, AgentConfig.model_fields["model"].default):
            return (f"{where} '{name}' runs on its base model {base}, not {where[:-len('.expert')]}.model "
                    f"'{agent.model}'; remove model (a seat's model is its expert's)")
        if recipe.build is not None:
            return (f"{where} '{name}' trains on data built from this team's own debate: a cycle within one "
                    f"generation; use generations (generations: {{count: 2, seats: [{name}, ...]}}) so that "
                    "generation 2's team seats generation 1's experts")
    return None


def _generation_seat_problem(recipe: Recipe, wrong: Callable[..., str | None]) -> str | None:
    """The first problem with ``generations``: its sections, its seats, its self student, its eval."""
    team = recipe.team
    gens = recipe.generations
    if gens is not None and gens.count > 1:
        missing = [s for s in ("task", "team", "build", "train") if getattr(recipe, s) is None]
        if missing:
            return f"generations.count {gens.count} needs the sections {missing}: each generation debates, builds " \
                   "and trains"
        if len(gens.seats) != len(team.agents):  # type: ignore[union-attr]
            return (f"generations.seats has {len(gens.seats)} seats for a team of {len(team.agents)} agents "  # type: ignore[union-attr]
                    "(team.agents); give one seat per agent, in the agents' order")
        for i, (name, agent) in enumerate(zip(gens.seats, team.agents, strict=True)):  # type: ignore[union-attr]
            if (problem := wrong(f"generations.seats.{i}", name, base_ok=True)) is not None:
                return problem
            if name != "base" and agent.backend == "openai":
                return (f"generations.seats.{i} '{name}' would sit on team.agents.{i}, an openai agent, whose server "
                        "answers with its own model, not the expert's weights; seat base there, or give that agent "
                        "backend transformers or vllm")
        selfs = [t.expert_name for t in recipe.train.trainings() if t.data == "self"]  # type: ignore[union-attr]
        if gens.self_student is not None and gens.self_student not in selfs:
            return (f"generations.self_student '{gens.self_student}' is not an expert with data: self; use one of: "
                    f"{', '.join(selfs) or 'none (the recipe has no self baseline)'}")
        if selfs and team.agents[0].backend == "openai":  # type: ignore[union-attr]
            return (f"generation g's self baseline samples generation g-1's self student "
                    f"({gens.self_student or selfs[0]}) on team.agents.0, an openai agent, whose server answers "
                    "with its own model, not the student's weights; give that agent backend transformers or vllm")
        if gens.stop_if_no_gain and recipe.eval is None:
            return "generations.stop_if_no_gain compares generations on eval's held-out problems; add an eval section"
        if recipe.eval is not None and "greedy" not in recipe.eval.modes:
            return ("generations compares each generation's students greedy (the report per generation, the stop "
                    "rule); add greedy to eval.modes")
    return None

