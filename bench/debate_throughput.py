"""Debate generation throughput: pluribus (one batch per model per round) vs the naive per-agent generate loop,
and with ``--vllm`` the same debate on vLLM, in-process and through its OpenAI-compatible server.

Same problems (synthetic), the same model (embedded SmolLM2-135M, in the dtype pluribus runs on this CPU: bf16
where it computes it natively, else float32), 3 agents x 2 rounds, the same prompt templates, the same max new tokens, greedy decoding, one run:

- pluribus (transformers backend): ``run_debate`` into a temporary store; every round is one ``Backend.generate``
  call over all (problem x agent) conversations, split into ``--batch-size`` left-padded rows per ``model.generate``;
- naive: what most research code does, one ``model.generate`` per agent per problem per round;
- ``--vllm``: ``run_debate`` with ``backend: vllm`` (one ``llm.generate`` per round) and with ``backend: openai``
  against a vLLM server on loopback (every conversation a request, ``--concurrency`` in flight). Needs vLLM
  (.venv-vllm on CPU). On CPU each engine binds as many cores as torch's ``--threads``, so every side computes
  on the same number of cores. Engine start-up is timed apart, since it is paid once per stage.

Prints generated tokens/s of each (tokens up to and including end-of-turn), the ratios, and the load average.

    .venv/bin/python bench/debate_throughput.py --problems 48 --max-new-tokens 96 --batch-size 36 --threads 1
    .venv-vllm/bin/python bench/debate_throughput.py --problems 24 --max-new-tokens 96 --batch-size 36 --threads 1 --vllm
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Keep bench/ off sys.path: a script's name must never shadow an installed package (transformers
# probes for optional ones such as `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus.config import AgentConfig, Recipe, SamplingConfig, TaskConfig, TeamConfig  # noqa: E402
from pluribus.data.backends import TransformersBackend, backend_key, make_backend  # noqa: E402
from pluribus.data.prompts import DEFAULT_PROMPTS, fill  # noqa: E402
from pluribus.data.store import TrajectoryStore  # noqa: E402
from pluribus.data.tasks import load_problems  # noqa: E402
from pluribus.models import EMBEDDED  # noqa: E402
from pluribus.stages.debate import run_debate  # noqa: E402


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


def _tokens(root: str, name: str) -> tuple[int, list[dict]]:
    records = list(TrajectoryStore(Path(root) / name / "trajectories").iter_records())
    return sum(t["tokens_out"] for r in records for rnd in r["rounds"] for t in rnd), records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=36, help="rows per model.generate for pluribus")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--chunk", type=int, default=12, help="problems per interleaved measurement of every side")
    ap.add_argument("--vllm", action="store_true", help="also vLLM in-process and a vLLM server (needs vLLM)")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight to the vLLM server")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    agents, rounds = 3, 2
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    agent = AgentConfig(model=EMBEDDED, sampling=sampling)

    def team_of(a: AgentConfig) -> TeamConfig:
        return TeamConfig(agents=[a.model_copy(update={"name": f"agent{i}"}) for i in range(agents)],
                          rounds=rounds, batch_size=args.batch_size, problems_per_step=args.chunk)

    problems = load_problems(TaskConfig(source="synthetic", n=args.problems))
    backend = TransformersBackend(agent, batch_size=args.batch_size)
    # every side in the dtype the transformers backend runs on this CPU (float32 where bf16 is not native)
    dtype = backend.where["dtype"]
    print(f"{len(problems)} problems, {agents} agents x {rounds} rounds, max_new_tokens={args.max_new_tokens}, "
          f"greedy, {EMBEDDED} {dtype}, torch threads={torch.get_num_threads()}, batch size {args.batch_size}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    # name -> (team, backends): the sides that run through run_debate
    sides = {"pluribus": (team_of(agent), {backend_key(agent): backend})}
    server = None
    startup: dict[str, float] = {}
    if args.vllm:
        from pluribus.data.vllm_engine import VLLMServer, engine_kwargs
        from pluribus.models import resolve_model

        local = agent.model_copy(update={"backend": "vllm", "context_length": 2048, "dtype": dtype})
        t0 = time.perf_counter()
        engine = make_backend(local)
        startup["vllm"] = time.perf_counter() - t0
        sides["vllm"] = (team_of(local), {backend_key(local): engine})
        kwargs = engine_kwargs(None, model=str(resolve_model(EMBEDDED)), dtype=dtype, max_model_len=2048,
                               lora_rank_needed=None, trust_remote_code=False)
        t0 = time.perf_counter()
        server = VLLMServer(kwargs, served_name=EMBEDDED, log=Path(tempfile.gettempdir()) / "bench-vllm-server.log",
                            start_timeout_s=1800,
                            threads=torch.get_num_threads()).__enter__()
        startup["vllm-server"] = time.perf_counter() - t0
        remote = agent.model_copy(update={"backend": "openai", "base_url": server.base_url,
                                          "max_concurrency": args.concurrency, "timeout_s": 600.0})
        sides["vllm-server"] = (team_of(remote), {backend_key(remote): make_backend(remote)})
        print("engine start-up (paid once per stage): " + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items()))

    # Interleaved by chunks of problems (every side, then naive, on the same chunk), so that a change in the
    # load of a shared machine hits all sides alike; the totals are over all problems.
    seconds = dict.fromkeys([*sides, "naive"], 0.0)
    naive_tokens, naive = 0, {}
    try:
        with tempfile.TemporaryDirectory() as root:
            for k in range(0, len(problems), args.chunk):
                for name, (team, backends) in sides.items():
                    recipe = Recipe(name=name, root=root, task=TaskConfig(n=args.problems), team=team)
                    t0 = time.perf_counter()
                    run_debate(recipe, problems=problems[: k + args.chunk], backends=backends, progress=False)
                    seconds[name] += time.perf_counter() - t0
                t0 = time.perf_counter()
                n_tok, responses = naive_debate(backend, problems[k : k + args.chunk], agents, rounds,
                                                args.max_new_tokens)
                seconds["naive"] += time.perf_counter() - t0
                naive_tokens += n_tok
                naive.update(responses)
                print(f"  {min(k + args.chunk, len(problems))}/{len(problems)} problems: "
                      + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items()), flush=True)
            results = {name: _tokens(root, name) for name in sides}
    finally:
        if server is not None:
            server.stop()
    rate = {name: tok / seconds[name] for name, (tok, _) in results.items()}
    rate["naive"] = naive_tokens / seconds["naive"]
    calls = {"pluribus": f"{backend.calls} model.generate calls",
             "naive": f"{len(problems) * agents * rounds} model.generate calls",
             "vllm": "one llm.generate per round and step", "vllm-server": f"<= {args.concurrency} requests in flight"}
    for name in [*sides, "naive"]:
        tok = results[name][0] if name in results else naive_tokens
        print(f"{name + ':':13s}{tok} tokens in {seconds[name]:.1f} s = {rate[name]:.1f} tok/s ({calls[name]})")

    records = results["pluribus"][1]
    prompt_tokens = sum(t["tokens_in"] for r in records for rnd in r["rounds"] for t in rnd)
    print(f"pluribus prompt tokens whose prefill a finished row's cache saved (prefix_store): "
          f"{backend.prefixes.lent} of {prompt_tokens}")
    same = sum(r["rounds"][0][i]["response"] == naive[(r["problem_id"], 0)][i]
               for r in records for i in range(agents))
    print(f"round-0 responses identical to the naive loop: {same}/{len(records) * agents} "
          "(bf16 batched vs unbatched matmuls may flip a near-tie token)")
    ratio = rate["pluribus"] / rate["naive"]
    print(f"speedup (generated tokens/s): {ratio:.2f}x  (target >= 4x)")
    if args.vllm:
        for name in ("vllm", "vllm-server"):
            print(f"{name}: {rate[name] / rate['pluribus']:.2f}x the transformers backend, "
                  f"{rate[name] / rate['naive']:.2f}x the naive loop; start-up {startup[name]:.0f} s = the "
                  f"transformers backend's generation of {startup[name] * rate['pluribus']:.0f} tokens")
        ours = {r["problem_id"]: r for r in records}
        for name in ("vllm", "vllm-server"):
            same = sum(r["rounds"][0][i]["response"] == ours[r["problem_id"]]["rounds"][0][i]["response"]
                       for r in results[name][1] for i in range(agents))
            print(f"round-0 responses of {name} identical to the transformers backend's: {same}/{len(records) * agents}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
