"""The debate engine: N agents, R rounds, a topology and an aggregation, over problems; pure over its Backends.

It turns problems into trajectories and writes nothing: the debate stage (pluribus.stages.debate) stores them.

Protocol (Du et al. 2023, "Improving Factuality and Reasoning in Language Models through Multiagent Debate"):

- Round 0: every agent answers the question alone (``question`` template, after its persona as system prompt).
- Round r >= 1: every agent's conversation keeps its own earlier answers; a new user turn shows the peers'
  round r-1 responses (``debate`` template, one ``peer`` block each) and asks it to reconsider. With no peers
  (a single agent) the ``reflect`` template asks it to check its own answer.
- Topology says who sees whom: ``all`` (every other agent), ``ring`` (agent i sees agent i-1, a directed ring),
  ``star`` (with a judge: the judge reads every agent each round and the agents see only the judge's summary;
  without one, agent 0 is the hub: it sees everyone, the others see agent 0).
- Aggregation: ``majority`` over the last round's parsed answers; ties go to the answer with more votes over
  all rounds, then to the one given by the lowest-index agent in the last round; unparsable answers do not
  vote, and equal numbers written differently ("0.5", "1/2") are one answer. ``judge``: the judge agent reads the last round (``judge`` template) and its answer is final.
  ``prm_best`` / ``prm_vote``: the team's verifier (a PRM) scores every member's last-round solution step by
  step and chooses (pluribus.data.verify); every step score and aggregate is kept in ``meta.verifier``.
- Each peer response is trimmed to ``team.peer_token_budget`` tokens of the reader's tokenizer, keeping its
  *end* (the conclusion and final answer) behind a "[...]" mark; the dropped token counts are recorded in
  the turn's ``meta.peer_tokens_dropped``.
- N=1, R=1 is a single agent answering once: the path that evaluates one model (with or without an adapter).
- Prompts are never cut: a problem whose prompt does not fit an agent's context (round 0 is checked for every
  problem before the first step; a later round's prompt, peers trimmed, before that round) is refused with
  one line naming it and the numbers, or, with ``team.too_long: skip``, left out of the store and named in the
  summary (a rerun tries it again).
- Seeds: each conversation turn samples from ``conversation_seed(seed, problem, agent, round)``, one
  generator per row, so ``team.batch_size``, ``team.problems_per_step``, problem order and resuming (a torn
  step too) never change what is drawn. Steps are fixed slices of the task's problem list, and a step that a
  crash left half stored is debated again whole (only its missing problems are stored), so it is batched
  as in the uninterrupted run. A row's logits on a local backend still depend in their last bits on the
  rows batched with it: in float32 (``dtype: float32``) that flipped no token in ``bench/batch_invariance.py``,
  in bf16 it flips a third to a half of the responses, so for agents on 16-bit local backends
  ``team.batch_size`` and ``team.problems_per_step`` are part of ``config_hash`` (see there).

Speed: problems go through in steps of ``team.problems_per_step``; in each round of a step, all
(problem x agent) conversations of agents that share a backend and sampling settings are ONE
``Backend.generate`` call; ``on_batch`` hears of every finished batch (the stage's progress bar moves with it).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pluribus.config import AgentConfig, SamplingConfig, TeamConfig
from pluribus.data.answers import grade, vote_key
from pluribus.data.backends import Backend, Conversation, Generation, backend_key, make_backend
from pluribus.data.prompts import fill, resolve_prompts
from pluribus.data.records import Problem, Trajectory, Turn
from pluribus.data.verify import Verifier, verdict
from pluribus.errors import PluribusError

TRIM_MARK = "[...] "


# ----------------------------------------------------------------------------------------------- team


@dataclass(frozen=True)
class Member:
    """A debater or the judge: its name, its settings and the backend it generates with."""

    name: str
    agent: AgentConfig
    backend: Backend


@dataclass
class Team:
    members: list[Member]
    judge: Member | None
    config: TeamConfig
    prompts: dict[str, str]
    verifier: Verifier | None = None  # scores the last round's solutions (aggregation prm_best / prm_vote)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def judge_each_round(self) -> bool:
        return self.config.topology == "star" and self.judge is not None


def validate_team(team: TeamConfig) -> list[str]:
    """Agent names (agent<i> by default); a PluribusError for a duplicate name or a judge the config lacks."""
    names = [a.name or f"agent{i}" for i, a in enumerate(team.agents)]
    if len(set(names)) != len(names):
        raise PluribusError(f"team agent names must be unique, got {names}")
    if team.aggregation == "judge" and team.judge is None:
        raise PluribusError("team.aggregation is 'judge' but team.judge is not set; add a judge agent "
                            "or use aggregation: majority")
    resolve_prompts(team.prompts)
    return names


def build_team(team: TeamConfig, backends: Mapping[tuple, Backend], verifier: Verifier | None = None) -> Team:
    """Pair each agent (and the judge) with its backend from ``backends`` (keyed by ``backend_key``); a team that
    aggregates by a verifier (prm_best, prm_vote) takes the scorer in ``verifier``."""
    names = validate_team(team)
    if team.aggregation.startswith("prm_") and verifier is None:
        raise PluribusError(f"team.aggregation is '{team.aggregation}' but no verifier was given to score the "
                            "solutions; set team.verifier to a PRM")
    members = [Member(n, a, backends[backend_key(a)]) for n, a in zip(names, team.agents, strict=True)]
    judge = None
    if team.judge is not None:
        judge = Member(team.judge.name or "judge", team.judge, backends[backend_key(team.judge)])
    return Team(members, judge, team, resolve_prompts(team.prompts), verifier)


def make_backends(team: TeamConfig, *, trust_remote_code: bool = False, device: str | None = None
                  ) -> dict[tuple, Backend]:
    """One backend per distinct (backend, model, adapter, ..., device) among the agents and the judge; ``device``:
    the recipe's setting, for agents that name none (``pluribus.device``)."""
    agents = [*team.agents, *([team.judge] if team.judge else [])]
    engines = len({backend_key(a) for a in agents if a.backend == "vllm"})  # they share one GPU
    out: dict[tuple, Backend] = {}
    for agent in agents:
        key = backend_key(agent)
        if key not in out:
            out[key] = make_backend(agent, trust_remote_code=trust_remote_code, batch_size=team.batch_size,
                                    engines=engines, device=device)
    return out


# ------------------------------------------------------------------------------------------ the rounds


@dataclass
class _State:
    """One problem in flight: each agent's conversation so far and the turns of every round."""

    problem: Problem
    conversations: list[Conversation]
    rounds: list[list[Turn]] = field(default_factory=list)
    judge_turns: list[Turn] = field(default_factory=list)


def _trim(text: str, reader: Backend, budget: int) -> tuple[str, int]:
    n = reader.count_tokens(text)
    if n <= budget:
        return text, 0
    return TRIM_MARK + reader.keep_last_tokens(text, budget), n - budget


def _peer_block(team: Team, reader: Backend, peers: list[tuple[str, str]]) -> tuple[str, list[str], list[int]]:
    blocks, names, dropped = [], [], []
    for name, response in peers:
        text, cut = _trim(response, reader, team.config.peer_token_budget)
        blocks.append(fill(team.prompts["peer"], response=text, agent=name))
        names.append(name)
        dropped.append(cut)
    return "\n\n".join(blocks), names, dropped


def _peers_of(team: Team, state: _State, i: int) -> list[tuple[str, str]]:
    """(name, response) of what agent i sees of the previous round, by topology."""
    last = state.rounds[-1]
    n = len(team.members)
    topology = team.config.topology
    if topology == "star" and team.judge is not None:
        return [(team.judge.name, state.judge_turns[-1].response)]
    if topology == "star":
        idx = [j for j in range(n) if j != 0] if i == 0 else [0]
    elif topology == "ring":
        idx = [(i - 1) % n] if n > 1 else []
    else:
        idx = [j for j in range(n) if j != i]
    return [(team.members[j].name, last[j].response) for j in idx]


def round_prompt(team: Team, state: _State, i: int) -> tuple[str, list[str], list[int]]:
    """The user turn agent i is asked after ``state``'s last round, with the names of the peers it shows and the
    tokens trimmed from each: the ``debate`` template over its peers' responses (trimmed to the reader's
    ``team.peer_token_budget``), or ``reflect`` when it has no peer. The one builder of that prompt: the debate
    asks it, and the builders rebuild a stored round with it (``asked_in_round``)."""
    peers = _peers_of(team, state, i)
    if not peers:
        return fill(team.prompts["reflect"], question=state.problem.question), [], []
    block, names, dropped = _peer_block(team, team.members[i].backend, peers)
    return fill(team.prompts["debate"], peers=block, question=state.problem.question), names, dropped


def asked_in_round(team: Team, traj: Trajectory, i: int, rnd: int) -> str:
    """The user turn agent i of ``traj`` was asked in round ``rnd`` (>= 1), rebuilt with ``round_prompt`` from
    the stored rounds before it (and the judge's turns, in a star around a judge). ``team`` is the team that
    debated, its members' backends the readers that trimmed the peers (only their tokenizers are used).

    Raises PluribusError when the rebuilt prompt shows other peers, or trims them otherwise, than the stored
    turn records (``meta.peers``, ``meta.peer_tokens_dropped``): the store was written by another team."""
    if not 1 <= rnd < len(traj.rounds):
        raise PluribusError(f"problem '{traj.problem_id}' has no round {rnd} to rebuild (it has {len(traj.rounds)})")
    problem = Problem(traj.problem_id, traj.question, traj.gold)
    judge_turns = [Turn.from_dict(t) for t in (traj.meta.get("judge") or [])]
    state = _State(problem, [], rounds=[list(r) for r in traj.rounds[:rnd]], judge_turns=judge_turns[:rnd])
    text, names, dropped = round_prompt(team, state, i)
    turn = traj.rounds[rnd][i]
    stored = (turn.meta.get("peers"), turn.meta.get("peer_tokens_dropped"))
    if (stored[0] is not None and stored[0] != names) or (stored[1] is not None and stored[1] != dropped):
        raise PluribusError(
            f"problem '{traj.problem_id}', agent '{turn.agent}', round {rnd}: rebuilding its debate prompt shows "
            f"peers {names} trimmed by {dropped} tokens, but the store recorded {stored[0]} trimmed by {stored[1]}; "
            "the store was debated by another team (agents, topology, peer_token_budget or models): build with "
            "the recipe that made it")
    return text


def debate_prompts(team: TeamConfig, readers: Mapping[tuple, Any]) -> Callable[[Trajectory, Turn], str]:
    """``asked(trajectory, turn)``: the user turn ``turn``'s agent was asked in its round, rebuilt by
    ``asked_in_round`` for a store ``team`` debated. ``readers`` (keyed by ``backend_key``, e.g.
    ``backends.peer_reader``) count and trim the peers as each agent's backend did; nothing generates or scores,
    so the team is built without its verifier."""
    prompts_only = build_team(team.model_copy(update={"aggregation": "majority", "verifier": None}), readers)

    def asked(traj: Trajectory, turn: Turn) -> str:
        if turn.agent not in traj.team:
            raise PluribusError(f"problem '{traj.problem_id}': agent '{turn.agent}' is not in its team {traj.team}")
        return asked_in_round(prompts_only, traj, traj.team.index(turn.agent), turn.round)

    return asked


OnBatch = Callable[[list[Generation]], None]


def _generate(backend: Backend, conversations: list[Conversation], sampling: SamplingConfig,
              on_batch: OnBatch | None, seeds: list[int] | None = None) -> list[Generation]:
    """``backend.generate``, with one sampling seed per conversation where it takes ``seeds``, reporting each
    finished batch to ``on_batch``: through the backend where it takes ``on_batch`` (its micro-batches), else
    once for the whole call (a scripted or third-party backend). What it takes, it declares (``Backend``)."""
    kwargs: dict[str, Any] = {}
    if seeds is not None and backend.takes_seeds:
        kwargs["seeds"] = seeds
    if on_batch is not None and backend.takes_on_batch:
        kwargs["on_batch"] = on_batch
    gens = backend.generate(conversations, sampling, **kwargs)
    if on_batch is not None and "on_batch" not in kwargs:
        on_batch(gens)
    return gens


def conversation_seed(seed: int, problem_id: str, agent: str, rnd: int) -> int:
    """The sampling seed of one conversation turn: a hash of (seed, problem, agent, round), so neither the
    batch it is generated in, nor the problems around it, nor a resume changes what it draws."""
    digest = hashlib.sha256(json.dumps([seed, problem_id, agent, rnd]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


# (member, conversation, problem id, round): one generation request and what seeds it
Request = tuple[Member, Conversation, str, int]


def _generate_grouped(requests: list[Request], seed: int, on_batch: OnBatch | None = None) -> list[Generation]:
    """One ``generate`` call per (backend, sampling) group, results back in request order. Each conversation is
    seeded by ``conversation_seed`` from its agent's ``sampling.seed`` (when set) or the recipe's ``seed``.

    Agents that differ only in their seed (the single agent's k samples) share a call: their rows are seeded
    one by one anyway, and one call makes full batches in which rows with one prompt share its prefill."""
    groups: dict[tuple, list[int]] = {}
    per_row: dict[int, bool] = {}  # by backend: whether it takes one seed per row
    for k, (member, *_) in enumerate(requests):
        backend = id(member.backend)
        if backend not in per_row:
            per_row[backend] = member.backend.takes_seeds
        # a backend that takes one seed per call needs one call per seed (else k samples would draw alike)
        fields = member.agent.sampling.model_dump(exclude={"seed"} if per_row[backend] else None)
        groups.setdefault((backend, json.dumps(fields, sort_keys=True)), []).append(k)
    out: list[Generation | None] = [None] * len(requests)
    for rows in groups.values():
        member = requests[rows[0]][0]
        sampling: SamplingConfig = member.agent.sampling
        seeds = []
        for k in rows:
            own, conversation, problem_id, rnd = requests[k]
            base = own.agent.sampling.seed if own.agent.sampling.seed is not None else seed
            seeds.append(conversation_seed(base, problem_id, own.name, rnd))
        # a backend without per-row seeds gets one seed for the call, still a function of the first row only
        sampling = sampling.model_copy(update={"seed": seeds[0] % 2**31})
        gens = _generate(member.backend, [requests[k][1] for k in rows], sampling, on_batch, seeds)
        if len(gens) != len(rows):
            raise PluribusError(f"backend for '{member.backend.name}' returned {len(gens)} results "
                                f"for {len(rows)} conversations")
        for k, g in zip(rows, gens, strict=True):
            out[k] = g
    return out  # type: ignore[return-value]


def _overflow(member: Member, conv: Conversation, problem: Problem, rnd: int) -> str | None:
    """Why ``conv`` cannot be asked of ``member`` (its prompt does not fit the context), or None."""
    fit = member.backend.prompt_fit(conv, member.agent.sampling.max_new_tokens)
    if fit is None or fit.fits:
        return None
    return f"problem '{problem.id}' does not fit agent '{member.name}' in round {rnd}: {fit.describe()}"


def too_long_error(reason: str) -> PluribusError:
    return PluribusError(f"{reason}; prompts are never cut: shorten the question, raise the agent's context_length, "
                         "lower max_new_tokens or team.peer_token_budget, or set team.too_long=skip to leave such "
                         "problems out (named in the summary)")


def _drop_too_long(team: Team, states: list[_State], requests: list[Request], skipped: list[str] | None
                   ) -> set[int]:
    """Indices of ``states`` whose request in this round does not fit: an error under ``team.too_long=error``,
    else each is named in ``skipped``. ``requests`` hold each state's rows in order."""
    out: set[int] = set()
    by_id = {st.problem.id: k for k, st in enumerate(states)}
    for member, conv, pid, rnd in requests:
        k = by_id[pid]
        if k in out:
            continue
        reason = _overflow(member, conv, states[k].problem, rnd)
        if reason is None:
            continue
        if team.config.too_long == "error":
            raise too_long_error(reason)
        out.add(k)
        if skipped is not None:
            skipped.append(reason)
    return out


def check_prompts(problems: Sequence[Problem], team: Team) -> dict[str, str]:
    """Round 0 of every problem against every agent's context, before any step: under ``team.too_long=error``
    the first problem that does not fit raises; under ``skip`` {problem id: reason} of those that do not."""
    skipped: list[str] = []
    states = [_State(p, [_first_turn(team, m, p) for m in team.members]) for p in problems]
    requests = [(m, st.conversations[i], st.problem.id, 0) for st in states for i, m in enumerate(team.members)]
    drop = sorted(_drop_too_long(team, states, requests, skipped))
    return {states[k].problem.id: reason for k, reason in zip(drop, skipped, strict=True)}


def _first_turn(team: Team, member: Member, problem: Problem) -> Conversation:
    return _system(member.agent) + [{"role": "user", "content": fill(team.prompts["question"],
                                                                     question=problem.question)}]


def _turn(member: Member, rnd: int, gen: Generation, problem: Problem, peers: list[str], dropped: list[int]
          ) -> Turn:
    g = grade(gen.text, problem)
    return Turn(
        agent=member.name, round=rnd, model=member.backend.name, response=gen.text, answer=g.answer,
        correct=g.correct, tokens_in=gen.tokens_in, tokens_out=gen.tokens_out, seconds=round(gen.seconds, 6),
        meta={"peers": peers, "peer_tokens_dropped": dropped, "prompt_tokens_dropped": gen.dropped_tokens,
              "finish_reason": gen.finish_reason, "parse_method": g.method,
              **({"tokens_estimated": True} if gen.tokens_estimated else {})},
    )


def _judge_round(team: Team, states: list[_State], rnd: int, seed: int, on_batch: OnBatch | None = None,
                 skipped: list[str] | None = None) -> list[_State]:
    """The judge reads each state's last round; returns the states it could not read (prompt too long)."""
    assert team.judge is not None
    requests, meta = [], []
    for st in states:
        block, names, dropped = _peer_block(
            team, team.judge.backend, [(m.name, t.response) for m, t in zip(team.members, st.rounds[-1],
                                                                             strict=True)])
        conv = _system(team.judge.agent) + [
            {"role": "user", "content": fill(team.prompts["judge"], question=st.problem.question, peers=block)}]
        requests.append((team.judge, conv, st.problem.id, rnd))
        meta.append((names, dropped))
    drop = _drop_too_long(team, states, requests, skipped)
    keep = [k for k in range(len(states)) if k not in drop]
    gens = _generate_grouped([requests[k] for k in keep], seed, on_batch) if keep else []
    for k, gen in zip(keep, gens, strict=True):
        states[k].judge_turns.append(_turn(team.judge, rnd, gen, states[k].problem, *meta[k]))
    return [states[k] for k in drop]


def _system(agent: AgentConfig) -> Conversation:
    return [{"role": "system", "content": agent.persona}] if agent.persona else []


def generations_per_problem(team: TeamConfig) -> int:
    """How many generations ``debate_step`` makes per problem: every agent each round, plus the judge's."""
    judge = 0
    if team.judge is not None:
        judge = team.rounds if team.topology == "star" else int(team.aggregation == "judge")
    return team.rounds * len(team.agents) + judge


def debate_step(problems: Sequence[Problem], team: Team, *, run_id: str, seed: int = 0,
                on_batch: OnBatch | None = None, skipped: list[str] | None = None) -> list[Trajectory]:
    """Debate ``problems`` together for all rounds; one generate call per backend group per round.

    A problem whose prompt does not fit an agent's context in some round raises (``team.too_long=error``) or
    is left out of the result, its reason appended to ``skipped`` (``skip``).

    ``seed`` is the recipe's seed: each conversation turn samples from ``conversation_seed(seed, problem,
    agent, round)`` (an agent's own ``sampling.seed`` replaces ``seed``), never from its place in the batch.

    ``on_batch(generations)`` is called as each batch of generations finishes (progress within a step)."""
    states = [_State(p, [_first_turn(team, m, p) for m in team.members]) for p in problems]
    active = states
    gone: list[_State] = []
    for rnd in range(team.config.rounds):
        if rnd > 0 and team.config.early_stop:
            # every agent agrees: another round would only repeat the consensus (Du et al. stop on agreement too)
            active = [st for st in active if not agreed([t.answer for t in st.rounds[-1]])]
            if not active:
                break
        requests: list[Request] = []
        seen: list[tuple[list[str], list[int]]] = []
        for st in active:
            for i, member in enumerate(team.members):
                names: list[str] = []
                dropped: list[int] = []
                if rnd > 0:
                    text, names, dropped = round_prompt(team, st, i)
                    st.conversations[i].append({"role": "assistant", "content": st.rounds[-1][i].response})
                    st.conversations[i].append({"role": "user", "content": text})
                requests.append((member, st.conversations[i], st.problem.id, rnd))
                seen.append((names, dropped))
        n = len(team.members)
        drop = _drop_too_long(team, active, requests, skipped)
        if drop:
            gone += [active[k] for k in drop]
            keep = [k for k in range(len(active)) if k not in drop]
            requests = [requests[k * n + i] for k in keep for i in range(n)]
            seen = [seen[k * n + i] for k in keep for i in range(n)]
            active = [active[k] for k in keep]
        gens = _generate_grouped(requests, seed, on_batch) if requests else []
        k = 0
        for st in active:
            turns = []
            for member in team.members:
                turns.append(_turn(member, rnd, gens[k], st.problem, *seen[k]))
                k += 1
            st.rounds.append(turns)
        last = rnd == team.config.rounds - 1
        if team.judge is not None and (team.judge_each_round or (last and team.config.aggregation == "judge")):
            unread = _judge_round(team, active, rnd, seed, on_batch, skipped)
            gone += unread
            active = [st for st in active if st not in unread]
    if team.judge is not None and team.config.aggregation == "judge":
        # problems stopped early still get the judge's verdict on their last round
        stopped = [st for st in states if st not in gone
                   and len(st.judge_turns) < (len(st.rounds) if team.judge_each_round else 1)]
        for rnd in sorted({len(st.rounds) - 1 for st in stopped}):  # judged as of the round each stopped after
            gone += _judge_round(team, [st for st in stopped if len(st.rounds) - 1 == rnd], rnd, seed, on_batch,
                                 skipped)
    kept = [st for st in states if st not in gone]
    verdicts = _verify(team, kept) if team.config.aggregation.startswith("prm_") else {}
    return [_finish(st, team, run_id, verdicts.get(id(st))) for st in kept]


def _verify(team: Team, states: list[_State]) -> dict[int, tuple[int | None, dict[str, Any]]]:
    """Each state's verdict by the verifier (``pluribus.data.verify``): every member's last-round solution scored
    step by step, one group per problem (so batching never changes a score), keyed by ``id(state)``."""
    assert team.verifier is not None
    groups = [(st.problem.question, [t.response for t in st.rounds[-1]]) for st in states]
    scored = team.verifier.score(groups) if groups else []
    if len(scored) != len(groups):
        raise PluribusError(f"verifier '{team.verifier.name}' returned {len(scored)} results for {len(groups)} problems")
    out = {}
    for st, steps in zip(states, scored, strict=True):
        last = st.rounds[-1]
        out[id(st)] = verdict([t.agent for t in last], [t.answer for t in last], steps,
                              team.config.verifier_aggregate, team.config.aggregation, team.verifier.name)
    return out


def agreed(answers: Sequence[str | None]) -> bool:
    """Every agent gave a parsed answer and all are the same (the early-stop rule)."""
    return len(answers) > 1 and None not in answers and len({vote_key(a) for a in answers}) == 1  # type: ignore[arg-type]


def majority(turns: Sequence[Turn], history: Sequence[Sequence[Turn]]) -> tuple[str | None, bool | None, bool]:
    """(answer, correct, tie_broken) by majority over ``turns``; ties: more votes over ``history``, then lowest index.

    Answers vote by ``answers.vote_key``, so "0.5" and "1/2" are one answer; the winner is written as its first
    voter in ``turns`` wrote it.
    """
    votes = Counter(vote_key(t.answer) for t in turns if t.answer is not None)
    if not votes:
        return None, False, False
    top = max(votes.values())
    tied = [a for a, c in votes.items() if c == top]
    if len(tied) > 1:
        total = Counter(vote_key(t.answer) for rnd in history for t in rnd if t.answer is not None)
        best = max(total[a] for a in tied)
        tied = [a for a in tied if total[a] == best]
    first: dict[str, int] = {}
    for idx, t in enumerate(turns):
        if t.answer is not None:
            first.setdefault(vote_key(t.answer), idx)
    winner = turns[min(first[a] for a in tied)]
    return winner.answer, winner.correct, len([a for a, c in votes.items() if c == top]) > 1


def _finish(st: _State, team: Team, run_id: str, verified: tuple[int | None, dict[str, Any]] | None = None
            ) -> Trajectory:
    extra: dict[str, Any] = {}
    if team.config.aggregation == "judge":
        final, correct, tie = st.judge_turns[-1].answer, st.judge_turns[-1].correct, False
    elif verified is not None:
        pick, extra["verifier"] = verified
        chosen = st.rounds[-1][pick] if pick is not None else None
        final, correct, tie = (chosen.answer, chosen.correct, False) if chosen else (None, False, False)
    else:
        final, correct, tie = majority(st.rounds[-1], st.rounds)
    turns = [t for rnd in st.rounds for t in rnd] + st.judge_turns
    cost = {"tokens_in": sum(t.tokens_in for t in turns), "tokens_out": sum(t.tokens_out for t in turns),
            "seconds": round(sum(t.seconds for t in turns), 6)}
    # a server without usage and no tokenizer offline: the counts are guesses (OpenAIBackend._counts)
    guessed = {"tokens_estimated": True} if any(t.meta.get("tokens_estimated") for t in turns) else {}
    return Trajectory(
        problem_id=st.problem.id, question=st.problem.question, gold=st.problem.answer, team=team.names,
        rounds=st.rounds, final_answer=final, final_correct=correct, aggregation=team.config.aggregation,
        cost=cost, run_id=run_id,
        meta={"source": st.problem.source, "topology": team.config.topology, "tie_broken": tie,
              "judge": [t.to_dict() for t in st.judge_turns], **extra,
              **({"stopped_after_round": len(st.rounds) - 1} if len(st.rounds) < team.config.rounds else {}),
              **guessed},
    )
