"""What a system's stored answers score: accuracy with its interval, cost, self-correction, and the comparisons.

Each accuracy comes with its 95% Wilson interval; each system is compared with the single base agent on the same
problems (exact McNemar test), and with the team on the team's problems: the share of the team's gain over the
single agent that it recovers, at what fraction of its tokens. Self-consistency's budget vote and the verifier's
best-of-N re-choose among stored samples. The systems themselves are pluribus.eval.systems'; the eval stage
(pluribus.stages.eval) runs them into their stores and reports.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pluribus.eval.robustness import original_id
from pluribus.eval.stats import mcnemar_exact, paired, wilson_interval


@dataclass(frozen=True)
class SystemResult:
    """What one system scored on its problems."""

    system: str
    mode: str
    problems: int
    correct: int
    accuracy: float
    accuracy_low: float  # 95% Wilson interval
    accuracy_high: float
    first_answer_accuracy: float  # round 0, averaged over agents
    tokens_per_problem: float
    seconds_per_problem: float
    wrong_first_corrected: float  # of round-0 wrong agent answers, the fraction right in the last round
    unparsable: float  # fraction of final-round turns with no parsable answer
    tokens_estimated: int = 0  # problems whose token counts are estimates (a server without usage, no tokenizer)


def score(records: list[dict[str, Any]], system: str, mode: str) -> SystemResult:
    """Accuracy (with its 95% interval), cost and self-correction over a system's stored trajectories."""
    n = len(records)
    first = [t for r in records for t in r["rounds"][0]]
    last = [t for r in records for t in r["rounds"][-1]]
    wrong_first = corrected = 0
    for r in records:
        for a, b in zip(r["rounds"][0], r["rounds"][-1], strict=True):
            if not a["correct"]:
                wrong_first += 1
                corrected += bool(b["correct"])
    debated = any(len(r["rounds"]) > 1 for r in records)
    correct = sum(bool(r["final_correct"]) for r in records)
    low, high = wilson_interval(correct, n)
    return SystemResult(
        system=system, mode=mode, problems=n, correct=correct,
        accuracy=correct / n if n else 0.0, accuracy_low=low, accuracy_high=high,
        first_answer_accuracy=sum(bool(t["correct"]) for t in first) / len(first) if first else 0.0,
        tokens_per_problem=sum(r["cost"]["tokens_in"] + r["cost"]["tokens_out"] for r in records) / n if n else 0.0,
        seconds_per_problem=sum(r["cost"]["seconds"] for r in records) / n if n else 0.0,
        wrong_first_corrected=corrected / wrong_first if wrong_first and debated else 0.0,
        unparsable=sum(t["answer"] is None for t in last) / len(last) if last else 0.0,
        tokens_estimated=sum(bool((r.get("meta") or {}).get("tokens_estimated")) for r in records),
    )


def tokens(record: dict[str, Any]) -> int:
    """The tokens a stored trajectory spent: prompt and completion, every turn (its ``cost``)."""
    return record["cost"]["tokens_in"] + record["cost"]["tokens_out"]


def budget_vote(samples: dict[str, Any], budget: float) -> tuple[dict[str, Any], int]:
    """Self-consistency at a token budget: the first samples (in order) whose total tokens come closest to
    ``budget`` (at least one), then a majority vote over their parsed answers (ties: the answer seen first).

    ``samples`` is one stored trajectory of k independent agents (one round). Returns a trajectory-shaped record
    of the vote (its cost is what the used samples spent) and how many samples it used.
    """
    turns = samples["rounds"][0]
    used, spent = [], 0
    for t in turns:
        cost = t["tokens_in"] + t["tokens_out"]
        if used and spent + cost - budget > budget - spent:
            break  # without this sample the total is closer to the budget than with it
        used.append(t)
        spent += cost
        if spent >= budget:
            break
    from pluribus.data.answers import vote_key

    votes = Counter(vote_key(t["answer"]) for t in used if t["answer"] is not None)
    final, correct = None, False
    if votes:
        top = max(votes.values())
        winner = next(t for t in used if t["answer"] is not None and votes[vote_key(t["answer"])] == top)
        final, correct = winner["answer"], bool(winner["correct"])
    cost = {"tokens_in": sum(t["tokens_in"] for t in used), "tokens_out": sum(t["tokens_out"] for t in used),
            "seconds": sum(t["seconds"] for t in used)}
    return {**samples, "rounds": [used], "final_answer": final, "final_correct": correct, "cost": cost}, len(used)


def best_of_n(voted: list[dict[str, Any]], verifier: Any, how: str) -> list[dict[str, Any]]:
    """The last round of each record (prm-bon: sc's budget-matched records, ``budget_vote``'s, one round of the
    samples it voted over; team-prm: the team's transcripts), the answer chosen by the solution the verifier scores
    highest (``pluribus.data.verify``, ``prm_best``; ``how`` aggregates its step scores) instead of the majority.
    Same solutions, same cost: only the chooser differs. Each record keeps every step score in ``meta.verifier``."""
    from pluribus.data.verify import verdict

    groups = [(r["question"], [t["response"] for t in r["rounds"][-1]]) for r in voted]
    scored = verifier.score(groups) if groups else []
    out = []
    for r, steps in zip(voted, scored, strict=True):
        turns = r["rounds"][-1]
        pick, record = verdict([t["agent"] for t in turns], [t["answer"] for t in turns], steps, how, "prm_best",
                               verifier.name)
        chosen = turns[pick] if pick is not None else None
        out.append({**r, "final_answer": chosen["answer"] if chosen else None,
                    "final_correct": bool(chosen and chosen["correct"]), "aggregation": "prm_best",
                    "meta": {**(r.get("meta") or {}), "verifier": record}})
    return out


def chooser_agreement(vote: list[dict[str, Any]], verified: list[dict[str, Any]]) -> dict[str, Any]:
    """On the same solutions, the majority vote (sc, the team) against the verifier's choice (prm-bon, team-prm):
    how often one is right where the other is wrong, and how often any sample was right (either chooser's
    ceiling). McNemar's exact p over the problems where they differ."""
    by_id = {r["problem_id"]: r for r in vote}
    both = [(by_id[r["problem_id"]], r) for r in verified if r["problem_id"] in by_id]
    vote_wrong = [(v, p) for v, p in both if not v["final_correct"]]
    prm_wrong = [(v, p) for v, p in both if not p["final_correct"]]
    prm_only = sum(bool(p["final_correct"]) for _, p in vote_wrong)
    vote_only = sum(bool(v["final_correct"]) for v, _ in prm_wrong)
    return {"problems": len(both), "vote_wrong": len(vote_wrong), "verifier_right_when_vote_wrong": prm_only,
            "verifier_wrong": len(prm_wrong), "vote_right_when_verifier_wrong": vote_only,
            "any_sample_right": sum(any(t["correct"] for t in p["rounds"][-1]) for _, p in both),
            "p_value": mcnemar_exact(prm_only, vote_only)}


def seat_rounds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seat of a team, over its trajectories: round-0 and last-round accuracy, and how many answers the seat
    changed from right (round 0) to wrong (its last round) and from wrong to right. The last round is the last
    one each problem ran (early stopping may end a problem sooner)."""
    if not records:
        return []
    seats = list(records[0]["team"])
    out = []
    for i, name in enumerate(seats):
        pairs = [(bool(r["rounds"][0][i]["correct"]), bool(r["rounds"][-1][i]["correct"]))
                 for r in records if list(r["team"]) == seats]
        n = len(pairs)
        out.append({"seat": name, "problems": n, "round0_accuracy": sum(a for a, _ in pairs) / n if n else 0.0,
                    "final_accuracy": sum(b for _, b in pairs) / n if n else 0.0,
                    "right_to_wrong": sum(a and not b for a, b in pairs),
                    "wrong_to_right": sum(b and not a for a, b in pairs)})
    return out


def round_votes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The team stopped after each round: per round, the accuracy of that round's majority vote (the debate's own
    ``majority``, ties by the votes of the rounds so far), the tokens spent up to it, and against the team's final
    answer the problems only that vote got right, only the final got right, and their exact McNemar p.

    Exact for a team that aggregates by ``majority`` (a round never sees later ones; seeds are per conversation
    and round), a judge that only steers the rounds included. Empty where the trajectories differ in rounds (early
    stopping) or the team's answer is not a vote (``judge``, ``prm_best``, ``prm_vote``: stopping sooner would
    have been judged or scored anew)."""
    from types import SimpleNamespace

    from pluribus.data.debate import majority

    if not records or len({len(r["rounds"]) for r in records}) != 1 or len(records[0]["rounds"]) < 2:
        return []
    if any(r.get("aggregation", "majority") != "majority" for r in records):
        return []
    n = len(records)
    turns = [[[SimpleNamespace(answer=t["answer"], correct=t["correct"]) for t in rnd] for rnd in r["rounds"]]
             for r in records]
    final = [bool(r["final_correct"]) for r in records]
    out = []
    for k in range(len(records[0]["rounds"])):
        right = [bool(majority(rounds[k], rounds[:k + 1])[1]) for rounds in turns]
        spent = sum(t["tokens_in"] + t["tokens_out"] for r in records for rnd in r["rounds"][:k + 1] for t in rnd)
        only_round = sum(a and not b for a, b in zip(right, final, strict=True))
        only_final = sum(b and not a for a, b in zip(right, final, strict=True))
        out.append({"round": k, "problems": n, "accuracy": sum(right) / n, "tokens": spent / n,
                    "only_round": only_round, "only_final": only_final,
                    "p_value": mcnemar_exact(only_round, only_final)})
    return out


def early_stop_effect(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What stopping on agreement does, from the team's trajectories.

    Problems that stopped (``meta.stopped_after_round``) count as they ran. For full trajectories the effect is
    exact to compute: rounds run in order and never see later ones, so stopping after the first round in which
    every agent gave the same parsed answer yields that answer, at the tokens spent up to then.
    """
    from pluribus.data.debate import agreed

    if not records or max(len(r["rounds"]) for r in records) < 2:
        return None
    if any((r.get("meta") or {}).get("judge") for r in records):
        return None  # a judge's verdict and tokens after a stop are not in the trajectory: nothing exact to say
    n = len(records)
    ran_stopped = sum("stopped_after_round" in (r.get("meta") or {}) for r in records)
    if ran_stopped:  # run with team.early_stop: what it did is observed; the full debate was never run
        return {"problems": n, "observed": True, "stopped_early": ran_stopped,
                "accuracy_early_stop": sum(bool(r["final_correct"]) for r in records) / n,
                "tokens_early_stop": sum(tokens(r) for r in records) / n}
    full_tokens = stop_tokens = full_ok = stop_ok = stopped = 0
    for r in records:
        full_tokens += tokens(r)
        full_ok += bool(r["final_correct"])
        spent, outcome = 0, None
        for rnd in r["rounds"]:
            spent += sum(t["tokens_in"] + t["tokens_out"] for t in rnd)
            if rnd is not r["rounds"][-1] and agreed([t["answer"] for t in rnd]):
                outcome = bool(rnd[0]["correct"])
                break
        if outcome is None:
            stop_tokens += tokens(r)
            stop_ok += bool(r["final_correct"])
        else:
            stopped += 1
            stop_tokens += spent
            stop_ok += outcome
    return {"problems": n, "observed": False, "stopped_early": stopped,
            "accuracy_full": full_ok / n, "accuracy_early_stop": stop_ok / n,
            "tokens_full": full_tokens / n, "tokens_early_stop": stop_tokens / n,
            "tokens_saved": 1 - stop_tokens / full_tokens if full_tokens else 0.0}


def outcomes(records: list[dict[str, Any]]) -> dict[str, bool]:
    """Whether each problem (by its original id, perturbation suffix stripped) was answered correctly."""
    return {original_id(r["problem_id"]): bool(r["final_correct"]) for r in records}


def coverage(records: dict[str, list[dict[str, Any]]], asked: dict[str, set[str]]) -> dict[str, dict[str, int]]:
    """The systems that left some of the problems they were asked unanswered (a conversation too long for the
    model, skipped with ``team.too_long: skip``): ``{label: {asked, answered}}``; empty when every one answered
    all. Each accuracy is over what its system answered, each comparison over the problems both answered."""
    out = {}
    for label, ids in asked.items():
        answered = len(ids & set(outcomes(records.get(label, []))))
        if answered < len(ids):
            out[label] = {"asked": len(ids), "answered": answered}
    return out


def robustness_row(clean: list[dict[str, Any]], perturbed: list[dict[str, Any]], system: str,
                   mode: str) -> dict[str, Any]:
    """A system's answers to perturbed problems against its clean ones: the perturbed accuracy (its own
    records), and on the problems answered both ways (``problems``; a lengthened prompt may be skipped) the
    change of accuracy and the lost / gained problems with their exact McNemar p."""
    result = score(perturbed, system, mode)
    before, after = outcomes(clean), outcomes(perturbed)
    lost, gained, shared = paired(before, after)
    both = before.keys() & after.keys()
    change = (sum(after[i] for i in both) - sum(before[i] for i in both)) / shared if shared else 0.0
    return {"accuracy": result.accuracy, "accuracy_low": result.accuracy_low, "accuracy_high": result.accuracy_high,
            "problems": shared, "change": change, "lost": lost, "gained": gained,
            "p_value": mcnemar_exact(lost, gained)}


def compare(results: dict[str, dict[str, bool]]) -> list[dict[str, Any]]:
    """Every system against the single base agent of the same decoding (greedy if it has none), paired by problem."""
    singles = [k for k in results if k.startswith("single-")]
    if not singles:
        return []
    fallback = "single-greedy" if "single-greedy" in results else singles[0]
    out = []
    for label, solved in results.items():
        if label in singles:
            continue
        same_mode = f"single-{label.rsplit('-', 1)[-1]}"
        baseline = same_mode if same_mode in results else fallback
        wins, losses, shared = paired(solved, results[baseline])
        out.append({"system": label, "baseline": baseline, "problems": shared, "wins": wins, "losses": losses,
                    "p_value": mcnemar_exact(wins, losses)})
    return out


def team_gain(records: dict[str, list[dict[str, Any]]], team_ids: set[str]) -> dict[str, dict[str, Any]]:
    """On the team's problems: each system's share of the team's gain over single-greedy, and its token fraction.

    Each system is compared on the team's problems it answered (sc may run on fewer), with the single agent's
    and the team's figures on exactly those problems."""
    if "team" not in records or "single-greedy" not in records:
        return {}

    def acc_tokens(label: str, ids: set[str]) -> tuple[float, float]:
        mine = [r for r in records[label] if r["problem_id"] in ids]
        return (sum(bool(r["final_correct"]) for r in mine) / max(1, len(mine)),
                sum(tokens(r) for r in mine) / max(1, len(mine)))

    answered = {r["problem_id"] for r in records["team"]} & team_ids
    base, _ = acc_tokens("single-greedy", answered)
    team_acc, team_tokens = acc_tokens("team", answered)
    out = {}
    for label in records:
        if label in ("team", "single-greedy"):
            continue
        ids = answered & {r["problem_id"] for r in records[label]}
        acc, spent = acc_tokens(label, ids)
        b, _ = acc_tokens("single-greedy", ids)
        t_acc, t_tokens = acc_tokens("team", ids)
        out[label] = {"problems": len(ids), "accuracy_on_team_problems": acc, "gain_over_single": acc - b,
                      "share_of_team_gain": (acc - b) / (t_acc - b) if t_acc > b else None,
                      "token_fraction_of_team": spent / t_tokens if t_tokens else None}
    return {"problems": len(answered), "single_accuracy": base, "team_accuracy": team_acc, "team_gain": team_acc - base,
            "team_tokens_per_problem": team_tokens, "systems": out}
