"""Debate generation throughput: pluribus (one batch per model per round) vs the naive per-agent generate loop.

Same problems (synthetic), the same model (embedded SmolLM2-135M, bf16), 3 agents x 2 rounds, the same prompt
templates, the same max new tokens, greedy decoding, one process:

- pluribus: ``run_debate`` into a temporary store; every round is one ``Backend.generate`` call over all
  (problem x agent) conversations, split into ``--batch-size`` left-padded rows per ``model.generate``;
- naive: what most research code does, one ``model.generate`` per agent per problem per round.

Prints generated tokens/s of both (tokens up to and including end-of-turn) and the ratio (target >= 4x).

    .venv/bin/python bench/debate_throughput.py --problems 48 --max-new-tokens 96 --batch-size 36 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Keep bench/ off sys.path: a script's name must never shadow an installed package (transformers
# probes for optional ones such as `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus.config import AgentConfig, Recipe, SamplingConfig, TaskConfig, TeamConfig  # noqa: E402
from pluribus.data.backends import TransformersBackend, backend_key  # noqa: E402
from pluribus.data.debate import DEFAULT_PROMPTS, fill, run_debate  # noqa: E402
from pluribus.data.store import TrajectoryStore  # noqa: E402
from pluribus.data.tasks import load_problems  # noqa: E402
from pluribus.models import EMBEDDED  # noqa: E402


def naive_debate(backend: TransformersBackend, problems, n_agents: int, rounds: int, max_new: int):
    """The research-code loop: for each problem, for each round, for each agent, one generate call."""
    model, tok, eos = backend.model, backend.tokenizer, backend.eos
    tokens, responses = 0, {}
    for p in problems:
        convs = [[{"role": "user", "content": fill(DEFAULT_PROMPTS["question"], question=p.question)}]
                 for _ in range(n_agents)]
        last: list[str] = []
        for r in range(rounds):
            now = []
            for i in range(n_agents):
                if r > 0:
                    peers = "\n\n".join(fill(DEFAULT_PROMPTS["peer"], response=last[j])
                                        for j in range(n_agents) if j != i)
                    convs[i] += [{"role": "assistant", "content": last[i]},
                                 {"role": "user", "content": fill(DEFAULT_PROMPTS["debate"], peers=peers,
                                                                  question=p.question)}]
                text = tok.apply_chat_template(convs[i], tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False, return_tensors="pt")
                with torch.inference_mode():
                    out = model.generate(**ids, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                         pad_token_id=backend.pad, temperature=None, top_p=None, top_k=None)
                new = out[0, ids["input_ids"].shape[1]:].tolist()
                stop = next((k for k, t in enumerate(new) if t in eos), None)
                tokens += len(new) if stop is None else stop + 1
                now.append(tok.decode(new[:stop], skip_special_tokens=True))
            responses[(p.id, r)] = now
            last = now
    return tokens, responses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=36, help="rows per model.generate for pluribus")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--chunk", type=int, default=12, help="problems per interleaved ours/naive measurement")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    agents, rounds = 3, 2
    agent = AgentConfig(model=EMBEDDED, sampling=SamplingConfig(max_new_tokens=args.max_new_tokens))
    team = TeamConfig(agents=[agent.model_copy(update={"name": f"agent{i}"}) for i in range(agents)],
                      rounds=rounds, batch_size=args.batch_size, problems_per_step=args.chunk)
    problems = load_problems(TaskConfig(source="synthetic", n=args.problems))
    backend = TransformersBackend(agent, batch_size=args.batch_size)
    print(f"{len(problems)} problems, {agents} agents x {rounds} rounds, max_new_tokens={args.max_new_tokens}, "
          f"greedy, {EMBEDDED} bf16, torch threads={torch.get_num_threads()}, batch size {args.batch_size}")

    # Interleaved by chunks of problems (ours, then naive, on the same chunk), so that a change in the load of
    # a shared machine hits both sides alike; the totals are over all problems.
    ours_s = naive_s = 0.0
    naive_tokens, naive = 0, {}
    with tempfile.TemporaryDirectory() as root:
        recipe = Recipe(name="bench", root=root, task=TaskConfig(n=args.problems), team=team)
        for k in range(0, len(problems), args.chunk):
            t0 = time.perf_counter()
            run_debate(recipe, problems=problems[: k + args.chunk], backends={backend_key(agent): backend},
                       progress=False)
            ours_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            n_tok, responses = naive_debate(backend, problems[k : k + args.chunk], agents, rounds,
                                            args.max_new_tokens)
            naive_s += time.perf_counter() - t0
            naive_tokens += n_tok
            naive.update(responses)
            print(f"  {min(k + args.chunk, len(problems))}/{len(problems)} problems: ours {ours_s:.0f} s, "
                  f"naive {naive_s:.0f} s", flush=True)
        records = list(TrajectoryStore(Path(root) / "bench" / "trajectories").iter_records())
    ours_tokens = sum(t["tokens_out"] for r in records for rnd in r["rounds"] for t in rnd)
    print(f"pluribus: {ours_tokens} tokens in {ours_s:.1f} s = {ours_tokens / ours_s:.1f} tok/s "
          f"({backend.calls} model.generate calls)")
    print(f"naive:    {naive_tokens} tokens in {naive_s:.1f} s = {naive_tokens / naive_s:.1f} tok/s "
          f"({len(problems) * agents * rounds} model.generate calls)")

    same = sum(r["rounds"][0][i]["response"] == naive[(r["problem_id"], 0)][i]
               for r in records for i in range(agents))
    print(f"round-0 responses identical to the naive loop: {same}/{len(records) * agents} "
          "(bf16 batched vs unbatched matmuls may flip a near-tie token)")
    ratio = (ours_tokens / ours_s) / (naive_tokens / naive_s)
    print(f"speedup (generated tokens/s): {ratio:.2f}x  (target >= 4x)")


if __name__ == "__main__":
    main()
