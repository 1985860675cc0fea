"""Generation backends: request building and the context rule, batched local generation, the openai client."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from abc import ABC, abstractmethod
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pluribus.config import AgentConfig, Recipe, SamplingConfig, TaskConfig, TeamConfig
from pluribus.data.backends import (
    TAKE_OUT_AFTER,
    Fit,
    OpenAIBackend,
    PromptBuilder,
    PromptTooLong,
    TransformersBackend,
    make_backend,
)
from pluribus.data.store import TrajectoryStore
from pluribus.errors import PluribusError
from pluribus.stages.debate import run_debate

GREEDY8 = SamplingConfig(max_new_tokens=8)



@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> TransformersBackend:
    return TransformersBackend(AgentConfig(model=str(tiny_llama_dir), dtype="float32"), batch_size=3)


def convs(n: int) -> list[list[dict]]:
    # Lengths differ so that rows are left-padded against each other.
    return [[{"role": "user", "content": "What is " + " plus ".join(str(j) for j in range(i + 1)) + "?"}]
            for i in range(n)]


def test_prompt_builder_context_rule(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    b = PromptBuilder(tok, context_length=64, model_name="tiny")
    short = b.encode(convs(1)[0], max_new_tokens=16)
    assert short.max_new_tokens == 16
    assert tok.decode(short.ids).endswith("<|im_start|>assistant\n")
    long = [{"role": "system", "content": "You are careful."}, {"role": "user", "content": "word " * 200 + "?"}]
    full = tok(b.render(long), add_special_tokens=False)["input_ids"]
    # Prompt room = 64 - 16: a longer prompt is refused with the numbers, never cut (the persona would go).
    with pytest.raises(PromptTooLong, match=f"its prompt is {len(full)} tokens, and the context of 64 leaves 48"):
        b.encode(long, max_new_tokens=16)
    assert b.fit(long, 16) == Fit(len(full), 48, 64, 16) and not b.fit(long, 16).fits
    # New tokens get at most half the context.
    assert b.fit(convs(1)[0], max_new_tokens=1000).max_new == 32
    no_template = AutoTokenizer.from_pretrained(tiny_llama_dir)
    no_template.chat_template = None
    with pytest.raises(PluribusError, match="no chat template"):
        PromptBuilder(no_template, 64, "tiny")


def test_batched_greedy_equals_one_at_a_time(tiny):
    batch = tiny.generate(convs(7), GREEDY8)
    assert tiny.calls == 1  # 7 conversations, one decode, at most 3 rows at once
    for conv, g in zip(convs(7), batch, strict=True):
        alone = tiny.generate([conv], GREEDY8)[0]
        assert (g.text, g.tokens_out, g.tokens_in) == (alone.text, alone.tokens_out, alone.tokens_in)
        assert 1 <= g.tokens_out <= 8 and g.seconds > 0
    assert batch[0].tokens_in < batch[6].tokens_in


def test_sampling_is_seeded(tiny):
    s = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=7)
    a, b = tiny.generate(convs(4), s), tiny.generate(convs(4), s)
    c = tiny.generate(convs(4), s.model_copy(update={"seed": 8}))
    assert [g.text for g in a] == [g.text for g in b] != [g.text for g in c]


def test_continuation_and_long_conversation(tiny_llama_dir):
    backend = TransformersBackend(AgentConfig(model=str(tiny_llama_dir), dtype="float32", context_length=128),
                                  batch_size=4)
    prefix = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two"}]
    rendered = backend.builder.render(prefix)
    assert rendered.endswith("one two")  # continued, not closed and reopened
    long = [{"role": "user", "content": "blah " * 300}]
    out = backend.generate([prefix], SamplingConfig(max_new_tokens=100))
    # max_new 100 -> 64 (half the context)
    assert out[0].tokens_out <= 64
    assert backend.prompt_fit(long, 100).room == 64 and not backend.prompt_fit(long, 100).fits
    with pytest.raises(PromptTooLong, match="leaves 64 for the prompt after 64 new tokens"):
        backend.generate([prefix, long], SamplingConfig(max_new_tokens=100))


def test_make_backend_errors():
    with pytest.raises(PluribusError, match="no-such-model"):
        make_backend(AgentConfig(model="no-such-model"))
    with pytest.raises(PluribusError, match="base_url"):
        make_backend(AgentConfig(backend="openai"))
    with pytest.raises(PluribusError, match="PLURIBUS_TEST_UNSET_KEY"):
        make_backend(AgentConfig(backend="openai", base_url="http://127.0.0.1:1/v1",
                                 api_key_env="PLURIBUS_TEST_UNSET_KEY"))
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # where vLLM is installed, tests/vllm runs the backend itself
        with pytest.raises(PluribusError, match="needs vLLM; install vLLM"):
            make_backend(AgentConfig(backend="vllm"))


# ---------------------------------------------------------------------------------------- openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChatServer(ABC):
    """A real HTTP server speaking the chat-completions wire format on loopback; ``reply(body)`` says the status
    and the text of each answer."""

    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

    def __init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, text = outer.reply(body, self.headers)
                payload = {"error": {"message": text}} if status != 200 else {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                    "usage": outer.usage}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @abstractmethod
    def reply(self, body: dict, headers) -> tuple[int, str]:
        """The HTTP status and the text (of the answer, or of the error) for one request."""

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FlakyServer(ChatServer):
    """Fails the first requests on purpose (``failures``: their statuses), then answers \\boxed{4}."""

    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}

    def __init__(self, failures: list[int]) -> None:
        self.failures = list(failures)
        self.seen: list[dict] = []
        super().__init__()

    def reply(self, body: dict, headers) -> tuple[int, str]:
        self.seen.append({"auth": headers.get("Authorization"), "body": body})
        status = self.failures.pop(0) if self.failures else 200
        return status, "\\boxed{4}" if status == 200 else "try later"


def openai_agent(url: str, **kw) -> AgentConfig:
    return AgentConfig(backend="openai", model="served-model", base_url=url, **kw)


def test_openai_retries_429_and_5xx_then_succeeds(monkeypatch):
    server = FlakyServer([429, 503, 500])
    monkeypatch.setenv("PLURIBUS_TEST_KEY", "sekret")
    try:
        backend = OpenAIBackend(openai_agent(server.url, api_key_env="PLURIBUS_TEST_KEY", max_retries=3),
                                backoff_s=0.01)
        out = backend.generate(convs(1), SamplingConfig(max_new_tokens=5, seed=3))
        assert out[0].text == "\\boxed{4}" and (out[0].tokens_in, out[0].tokens_out) == (11, 3)
        assert backend.requests == 4 and server.seen[-1]["auth"] == "Bearer sekret"
        assert server.seen[-1]["body"]["max_tokens"] == 5 and server.seen[-1]["body"]["seed"] == 3
        server.failures = [503, 503, 503, 503]
        with pytest.raises(PluribusError, match="failed 4 times"):
            backend.generate(convs(1), GREEDY8)
        server.failures = [400]
        n = backend.requests
        with pytest.raises(PluribusError, match="HTTP 400"):
            backend.generate(convs(1), GREEDY8)
        assert backend.requests == n + 1  # a client error is not retried
    finally:
        server.close()


def test_openai_refused_connection_retries_then_clear_error():
    backend = OpenAIBackend(openai_agent(f"http://127.0.0.1:{free_port()}/v1", max_retries=2), backoff_s=0.01)
    # One conversation: with several, the first to give up ends the call while others may still be retrying.
    with pytest.raises(PluribusError, match=r"failed 3 times .*APIConnectionError.*check the server is up"):
        backend.generate(convs(1), GREEDY8)
    assert backend.requests == 3


class EchoServer(ChatServer):
    """A server whose reply names the request (its seed and question), or that fails every request with
    ``status``: a stand-in for a server of the same model that answers or is broken."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.answered = status, 0
        super().__init__()

    def reply(self, body: dict, headers) -> tuple[int, str]:
        self.answered += self.status == 200
        return self.status, f"{body.get('seed')}|{body['messages'][-1]['content']}" if self.status == 200 else "broken"


def test_openai_servers_share_requests_and_a_broken_one_is_taken_out():
    good, other, broken = EchoServer(), EchoServer(), EchoServer(status=503)
    refused = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    try:
        sampling = SamplingConfig(max_new_tokens=4, temperature=0.7, seed=100)
        expected = [f"{100 + i}|{c[-1]['content']}" for i, c in enumerate(convs(12))]
        backend = OpenAIBackend(openai_agent([broken.url, good.url, refused, other.url], max_concurrency=2,
                                             max_retries=5), backoff_s=0.01)
        out = backend.generate(convs(12), sampling)
        # every result is its own conversation's (seed and question), in order, once
        assert [g.text for g in out] == expected
        live = {s.url: s.live for s in backend.servers}
        assert live == {broken.url: False, good.url: True, refused: False, other.url: True}
        served = {s.url: s.served for s in backend.servers}
        assert served[broken.url] == served[refused] == 0 and served[good.url] + served[other.url] == 12
        assert good.answered + other.answered == 12
        # a server taken out stays out: the next call sends it nothing
        sent = backend.requests
        assert [g.text for g in backend.generate(convs(12), sampling)] == expected
        assert backend.requests == sent + 12
        # the same conversations through one server give the same results
        one = OpenAIBackend(openai_agent(good.url), backoff_s=0.01)
        assert [g.text for g in one.generate(convs(12), sampling)] == expected
    finally:
        for s in (good, other, broken):
            s.close()


def test_openai_every_server_failing_is_a_clear_error_and_the_last_is_kept():
    a, b = EchoServer(status=503), EchoServer(status=500)
    try:
        backend = OpenAIBackend(openai_agent([a.url, b.url], max_retries=4, max_concurrency=1), backoff_s=0.01)
        with pytest.raises(PluribusError, match=r"failed 5 times over 2 servers .*taken out.*live.*Check the "
                                                r"servers are up"):
            backend.generate(convs(1), GREEDY8)
        assert [s.live for s in backend.servers].count(True) == 1  # the last server is never taken out
    finally:
        a.close()
        b.close()


def test_openai_server_list_is_checked():
    with pytest.raises(ValueError, match="listed twice"):
        openai_agent(["http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1"])
    with pytest.raises(ValueError, match="'nope' is not a server URL"):
        openai_agent(["http://127.0.0.1:1/v1", "nope"])
    with pytest.raises(ValueError, match="empty list"):
        openai_agent([])


@contextlib.contextmanager
def transformers_serve(model_dir: Path, port: int):
    """`transformers serve` pinned to a local folder on a loopback port (offline); stopped on exit."""
    exe = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"transformers serve did not start (exit code {proc.poll()})")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.integration
def test_openai_backend_against_transformers_serve(tiny_llama_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with transformers_serve(tiny_llama_dir, port):
        # The served model's name is its folder; that also lets pluribus load the tokenizer offline.
        backend = OpenAIBackend(AgentConfig(backend="openai", model=str(tiny_llama_dir), base_url=url,
                                            max_concurrency=2))
        assert backend.builder is not None
        out = backend.generate(convs(3), SamplingConfig(max_new_tokens=6))
        assert len(out) == 3 and all(0 < g.tokens_out <= 6 and g.tokens_in > 0 for g in out)
        cont = backend.generate([[{"role": "user", "content": "Count."},
                                  {"role": "assistant", "content": "one two"}]], SamplingConfig(max_new_tokens=4))
        assert 0 < cont[0].tokens_out <= 4


@pytest.mark.slow
@pytest.mark.integration
def test_server_stops_mid_run_then_rerun_completes_exactly_once(tmp_path, tiny_llama_dir):
    port = free_port()
    agent = AgentConfig(backend="openai", model=str(tiny_llama_dir), base_url=f"http://127.0.0.1:{port}/v1",
                        max_retries=2, timeout_s=30, sampling=SamplingConfig(max_new_tokens=4))
    recipe = Recipe(name="srv", root=str(tmp_path), task=TaskConfig(n=4),
                    team=TeamConfig(agents=[agent, agent.model_copy(update={"name": "b"})], rounds=2,
                                    problems_per_step=2))
    store_dir = tmp_path / "srv" / "trajectories"
    with transformers_serve(tiny_llama_dir, port) as proc:

        def stop_after_first_step(done: int, total: int) -> None:
            if done == 2:
                proc.terminate()
                proc.wait(timeout=30)

        with pytest.raises(PluribusError, match="failed 3 times"):
            run_debate(recipe, progress=False, on_step=stop_after_first_step)
    stored = list(TrajectoryStore(store_dir).iter_records())
    assert len(stored) == 2  # the first step, intact
    with transformers_serve(tiny_llama_dir, port):
        summary = run_debate(recipe, progress=False)
    assert summary.problems == 4 and summary.new == 2
    ids = [r["problem_id"] for r in TrajectoryStore(store_dir).iter_records()]
    assert len(ids) == 4 and len(set(ids)) == 4 and ids[:2] == [r["problem_id"] for r in stored]


def _without_timings(record):
    """A stored record minus what differs between two runs of the same team: wall times and the run id."""
    if isinstance(record, dict):
        return {k: _without_timings(v) for k, v in record.items() if k not in {"seconds", "run_id"}}
    if isinstance(record, list):
        return [_without_timings(v) for v in record]
    return record


@pytest.mark.slow
@pytest.mark.integration
def test_debate_over_two_servers_survives_one_killed_mid_run(tmp_path, tiny_llama_dir):
    """Two `transformers serve` processes behind one agent, the first killed (SIGKILL) while it holds a
    request: the run finishes, every problem is stored once, and the records equal a run on one server."""
    from pluribus.data.backends import backend_key

    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}/v1", f"http://127.0.0.1:{port_b}/v1"

    def recipe(name: str, base_url) -> Recipe:
        # one request at a time per server: `transformers serve` seeds torch's global RNG per request
        agent = AgentConfig(backend="openai", model=str(tiny_llama_dir), base_url=base_url, max_concurrency=1,
                            max_retries=3, timeout_s=60, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0))
        return Recipe(name=name, root=str(tmp_path), seed=7, task=TaskConfig(n=6),
                      team=TeamConfig(agents=[agent, agent.model_copy(update={"name": "b"})], rounds=2,
                                      problems_per_step=3))

    with transformers_serve(tiny_llama_dir, port_a) as proc_a, transformers_serve(tiny_llama_dir, port_b):
        run_debate(recipe("one", url_b), progress=False)
        two = recipe("two", [url_a, url_b])
        backend = OpenAIBackend(two.team.agents[0])
        killed = threading.Event()

        def kill_a_once_it_served_three() -> None:
            while backend.servers[0].served < 3:
                time.sleep(0.01)
            proc_a.kill()  # mid-run: server a holds its next request by now
            proc_a.wait()
            killed.set()

        threading.Thread(target=kill_a_once_it_served_three, daemon=True).start()
        summary = run_debate(two, progress=False, backends={backend_key(two.team.agents[0]): backend})
    assert killed.is_set() and summary.problems == 6 and summary.new == 6
    a, b = backend.servers
    assert not a.live and b.live and a.served >= 3 and a.served + b.served == 6 * 2 * 2
    assert backend.requests >= 6 * 2 * 2 + TAKE_OUT_AFTER  # a's failed attempts were sent again to b
    one = [_without_timings(r) for r in TrajectoryStore(tmp_path / "one" / "trajectories").iter_records()]
    got = [_without_timings(r) for r in TrajectoryStore(tmp_path / "two" / "trajectories").iter_records()]
    assert len({r["problem_id"] for r in got}) == len(got) == 6  # nothing lost, nothing twice
    assert got == one  # same records, same order, as on one server


def test_row_sampler_draws_each_row_from_its_softmax_and_top_p():
    import torch

    from pluribus.data.decoding import row_sampler

    probs = torch.tensor([0.2, 0.0, 0.5, 0.3])
    logits = probs.log().expand(2, 4).clone()
    counts = torch.zeros(2, 4)
    sampler = row_sampler([1, 2], temperature=1.0, top_p=1.0)
    for _ in range(4000):
        counts[torch.arange(2), sampler(logits, [0, 1])] += 1
    torch.testing.assert_close(counts / 4000, probs.expand(2, 4), atol=0.03, rtol=0)
    # top_p 0.6 keeps 0.5 and 0.3 (the mass before 0.2 already reaches 0.6), renormalized
    counts = torch.zeros(4)
    sampler = row_sampler([3], temperature=1.0, top_p=0.6)
    for _ in range(4000):
        counts[sampler(logits[:1], [0])[0]] += 1
    torch.testing.assert_close(counts / 4000, torch.tensor([0.0, 0.0, 0.625, 0.375]), atol=0.03, rtol=0)
    # the same seed, the same draws, whatever row it sits in
    a = [row_sampler([5, 9], 1.0, 1.0) for _ in range(2)]
    b = row_sampler([9], 1.0, 1.0)
    assert all(a[0](logits, [0, 1])[1] == b(logits[:1], [0])[0] for _ in range(50))
    # a finished row leaves the batch: the others keep drawing from their own generators
    c, d = row_sampler([5, 9], 1.0, 1.0), row_sampler([9], 1.0, 1.0)
    c(logits, [0, 1])
    d(logits[:1], [0])
    assert all(c(logits[:1], [1])[0] == d(logits[:1], [0])[0] for _ in range(50))


class NoUsageServer(ChatServer):
    """Answers \\boxed{4} and sends no usage, as some OpenAI-compatible servers do."""

    usage = None

    def reply(self, body: dict, headers) -> tuple[int, str]:
        return 200, "The sum is \\boxed{4}."


def test_openai_without_usage_counts_with_the_tokenizer_or_says_it_estimates(tiny_llama_dir, caplog):
    import logging

    from transformers import AutoTokenizer

    server = NoUsageServer()
    conv = [{"role": "user", "content": "What is 2 plus 2?"}]
    try:
        # the model's tokenizer offline: the prompt as its chat template renders it, the reply as its tokens
        with caplog.at_level(logging.WARNING, logger="pluribus.data.backends"):
            local = OpenAIBackend(AgentConfig(backend="openai", model=str(tiny_llama_dir), base_url=server.url))
        assert "tokenizer" not in caplog.text
        g = local.generate([conv], GREEDY8)[0]
        tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
        prompt = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert g.tokens_in == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert g.tokens_out == len(tok(g.text, add_special_tokens=False)["input_ids"]) and not g.tokens_estimated

        # a served name with no tokenizer here: said once when the backend starts, once when it first estimates
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pluribus.data.backends"):
            remote = OpenAIBackend(openai_agent(server.url))
            out = remote.generate([conv, conv], GREEDY8) + remote.generate([conv], GREEDY8)
        assert caplog.text.count("tokenizer of model 'served-model' does not load offline") == 1
        assert caplog.text.count("sent no token usage") == 1
        # the characters of what was asked, not of str(messages) with its braces and keys
        assert all(g.tokens_estimated and g.tokens_in == len(conv[0]["content"]) // 4 for g in out)
        assert out[0].tokens_out == len("The sum is \\boxed{4}.") // 4 and remote.estimated == 3
    finally:
        server.close()


def test_estimated_token_counts_reach_the_trajectory_and_the_eval_summary(tmp_path):
    from dataclasses import asdict

    from pluribus.eval.report import markdown
    from pluribus.eval.scoring import score
    from pluribus.stages.eval import summary_of

    server = NoUsageServer()
    try:
        recipe = Recipe(name="est", root=str(tmp_path), task=TaskConfig(n=2),
                        team=TeamConfig(agents=[openai_agent(server.url)], rounds=1))
        run_debate(recipe, progress=False)
    finally:
        server.close()
    with TrajectoryStore(tmp_path / "est" / "trajectories") as store:
        records = list(store.iter_records())
    assert len(records) == 2 and all(r["meta"]["tokens_estimated"] for r in records)
    assert all(r["rounds"][0][0]["meta"]["tokens_estimated"] for r in records)
    systems = {"team": asdict(score(records, "team", "as-configured")),
               "sc": {**asdict(score(records, "sc", "sampled")), "samples_drawn": 2, "mean_samples_used": 1.5,
                      "budget_reached": 0.5}}
    assert systems["team"]["tokens_estimated"] == 2
    payload = {"run": "est", "tasks": [{"name": "heldout", "task": "synthetic", "split": "heldout", "problems": 2,
                                        "team_problems": 2, "systems": systems, "comparisons": []}],
               "systems": systems, "comparisons": []}
    shown = summary_of(recipe, payload).warnings
    assert any("team: the token counts of 2 of its 2 problems are estimates" in w for w in shown)
    assert any("sc's budget is approximate" in w for w in shown)
    assert "Estimated token counts" in markdown(payload) and "sc's budget (the team's tokens)" in markdown(payload)


@pytest.mark.parametrize("cls", ["TransformersBackend", "OpenAIBackend", "VLLMBackend"])
def test_each_backend_declares_what_its_generate_takes(cls):
    import inspect

    import pluribus.data.backends as backends

    backend = getattr(backends, cls)
    params = inspect.signature(backend.generate).parameters
    # callers read the declarations, never the signature: the two must agree
    assert backend.takes_seeds == ("seeds" in params) and backend.takes_on_batch == ("on_batch" in params)
    assert callable(backend.prompt_fit)


def test_peer_reader_of_an_openai_agent_counts_as_its_backend(tiny_llama_dir):
    from transformers import AutoTokenizer

    from pluribus.data.backends import peer_reader

    text = "The answer is 12 because 5 + 7 = 12."
    local = peer_reader(AgentConfig(backend="openai", model=str(tiny_llama_dir), base_url="http://127.0.0.1:1/v1"))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert local.count_tokens(text) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert local.keep_last_tokens(text, 3) == tok.decode(tok(text, add_special_tokens=False)["input_ids"][-3:])
    # a served name with no tokenizer offline: about 4 characters a token, as OpenAIBackend counts
    served = peer_reader(AgentConfig(backend="openai", model="served-model", base_url="http://127.0.0.1:1/v1"))
    assert served.count_tokens(text) == len(text) // 4 and served.keep_last_tokens(text, 2) == text[-8:]


def test_the_transformers_backend_lends_no_cache_across_a_change_of_its_weights(tiny_llama_dir):
    # the store keeps finished rows' caches for a next round; weights changed in place (a training step, a
    # loaded state) empty it first, so nothing computed under the old weights is lent
    import torch

    backend = TransformersBackend(AgentConfig(model=str(tiny_llama_dir), dtype="float32"), batch_size=3)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=4)
    asked = [[[{"role": "user", "content": f"question {k} {i}"}] for i in range(3)] for k in range(3)]
    backend.generate(asked[0], greedy)
    backend.generate(asked[1], greedy)
    assert len(backend.prefixes) == 6  # the same weights: both calls' rows kept
    with torch.no_grad():
        next(backend.model.parameters()).add_(0.05)
    backend.generate(asked[2], greedy)
    assert len(backend.prefixes) == 3  # only the rows decoded under the new weights
    assert backend.generate([], greedy) == []
