"""`sparse-export serve` in a subprocess on a free port of 127.0.0.1, called with the official openai client
and raw HTTP: its text equals `generate`'s, batching does not change results, faults get their status codes
and the server keeps serving, a disconnect frees its slot, SIGTERM finishes what is in flight and exits 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["the model prunes weights", "sparse networks run faster", "every layer sees its own inputs",
           "data flows from load to", "the hessian keeps error", "servers with many cores",
           "prune to save to export", "little memory and"]


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    from tests.runtimes.test_sparse_cpu import _lively_tiny

    tokenizer.chat_template = TEMPLATE
    return _lively_tiny("llama", tmp_path_factory.mktemp("serve") / "tiny-llama", tokenizer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server subprocess; stop() ends it (SIGTERM, then SIGKILL) and returns its exit code."""

    def __init__(self, folder, *args, env=None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sparse_export.cli.main", "serve", str(folder), "--port", str(self.port),
             "--threads", "2", "--log-level", "warning", *args],
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)

    def wait_ready(self) -> "Running":
        deadline = time.monotonic() + 180      # importing and loading take seconds; a busy machine, more
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not come up in 180 s")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def servers(folder):
    """Both servers of this file, started together (each takes seconds to import and load): the main one, with
    an API key and a fault hook; a slow one (two slots, a queue of one, each step slowed to keep requests in
    flight) for the queue, disconnect and SIGTERM test."""
    started = [Running(folder, "--api-key", KEY, env={"SPARSE_EXPORT_SERVE_FAULT": "INJECT-FAULT"}),
               Running(folder, "--max-batch", "2", "--max-queue", "1", "--shutdown-timeout", "30",
                       env={"SPARSE_EXPORT_SERVE_STEP_DELAY": "0.02"})]
    try:
        yield {"main": started[0].wait_ready(), "slow": started[1].wait_ready()}
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _generate(folder, prompt, n, capsys, *extra) -> str:
    """What `sparse-export generate --runtime sparse-cpu` prints for the prompt (its text, no newline)."""
    from sparse_export.cli.main import main

    capsys.readouterr()
    assert main(["generate", str(folder), prompt, "--runtime", "sparse-cpu", "--max-new-tokens", str(n),
                 *(extra or ["--greedy"])]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def _chat_text(tokenizer, content):
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def test_openai_client_equals_generate(server, client, folder, tokenizer, capsys):
    prompt, n = PROMPTS[0], 24
    want = _generate(folder, prompt, n, capsys)
    assert len(want) > 5
    name = client.models.list().data[0].id
    assert name == "tiny-llama"
    got = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"]) and got.usage.completion_tokens == n
    assert got.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == "length"

    want_chat = _generate(folder, _chat_text(tokenizer, prompt), n, capsys)
    msgs = [{"role": "user", "content": prompt}]
    got = client.chat.completions.create(model=name, messages=msgs, max_tokens=n, temperature=0)
    assert got.choices[0].message.content == want_chat and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=name, messages=msgs, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert chunks[-1].usage.completion_tokens == n

    # a seeded sample: the same draw as `generate --temperature T --seed S`
    want_t = _generate(folder, prompt, n, capsys, "--temperature", "0.8", "--seed", "3")
    got = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0.8, seed=3)
    assert got.choices[0].text == want_t and want_t != want


def test_stop_strings(client):
    full = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[8:10]
    cut = text[:text.find(stop)]
    got = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_concurrent_requests_return_what_each_returns_alone(server, client):
    def one(i):
        seeded = i % 2 == 1       # half greedy, half sampled with a seed
        r = client.completions.create(model="tiny-llama", prompt=PROMPTS[i], max_tokens=40,
                                      temperature=0.9 if seeded else 0, seed=i)
        return r.choices[0].text

    alone = [one(i) for i in range(8)]
    before_steps, before_single = server.metric("sparse_export_batch_occupancy_count"), \
        server.metric('sparse_export_batch_occupancy_bucket{le="1.5"}')
    barrier = threading.Barrier(8)

    def together(i):
        barrier.wait()
        return one(i)

    with ThreadPoolExecutor(8) as pool:
        both = list(pool.map(together, range(8)))
    assert both == alone
    steps = server.metric("sparse_export_batch_occupancy_count") - before_steps
    single = server.metric('sparse_export_batch_occupancy_bucket{le="1.5"}') - before_single
    assert steps > 0 and single < steps           # some steps ran several sequences as one batch
    assert server.health()["active"] == 0 and server.health()["kv_reserved_tokens"] == 0


def _post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, content=raw if raw is not None else json.dumps(body), headers=headers,
                      timeout=30)


def test_faults_get_their_status_and_the_server_keeps_serving(server):
    ok = {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0}
    cases = [
        (400, dict(raw=b'{"prompt": "x", "max_tokens": ')),                      # malformed JSON
        (400, dict(body={"prompt": "x", "max_tokens": "4"})),                    # wrong types
        (400, dict(body={"prompt": 7})),
        (400, dict(body={"prompt": "x", "temperature": "hot"})),
        (400, dict(body={"messages": "hi"}, path="/v1/chat/completions")),
        (400, dict(body={"prompt": list(range(10, 10 + 600))})),                 # longer than the context (512)
        (400, dict(body={"prompt": "x", "max_tokens": 0})),
        (400, dict(body={"prompt": "x", "max_tokens": -3})),
        (401, dict(body=ok, key=None)),
        (401, dict(body=ok, key="wrong")),
        (401, dict(raw=b"{bad", key=None)),                                      # the key is checked first
        (404, dict(body={**ok, "model": "another-model"})),
        (500, dict(body={**ok, "prompt": "INJECT-FAULT here"})),                 # fails inside the scheduler
        (500, dict(body={**ok, "prompt": "INJECT-FAULT", "stream": True})),
    ]
    for status, kw in cases:
        r = _post(server, kw.pop("path", "/v1/completions"), kw.pop("body", None), **kw)
        assert r.status_code == status, (status, kw, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if status == 400 and "max_tokens" in json.dumps(kw.get("body")):
            assert err["param"] == "max_tokens"
        good = _post(server, "/v1/completions", ok)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 401
    assert server.health()["active"] == 0


def test_queue_disconnect_and_sigterm(servers):
    """Two slots, a queue of one, each step slowed: a client leaving mid-stream frees its slot at once; past
    the queue -> 429; SIGTERM with requests running and queued completes them all and exits 0."""
    s = servers["slow"]
    try:
        body = {"prompt": PROMPTS[3], "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert s.health()["active"] == 1
        t = time.monotonic()                       # closed after one token; 300 would take 6 s
        while s.health()["active"] and time.monotonic() - t < 3:
            time.sleep(0.05)
        h = s.health()
        assert h["active"] == 0 and h["kv_reserved_tokens"] == 0
        assert s.metric('sparse_export_requests_total{endpoint="/v1/completions",status="disconnected"}') == 1

        results, alone = {}, {}
        for i in range(3):                         # what each returns alone
            alone[i] = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPTS[i], "max_tokens": 40,
                                                                   "temperature": 0}, timeout=60).json()

        def full(i, n):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPTS[i], "max_tokens": n,
                                                            "temperature": 0}, timeout=60)
            results[i] = (r.status_code, r.json())

        threads = [threading.Thread(target=full, args=(i, 40)) for i in range(3)]
        for th in threads[:2]:
            th.start()
        while s.health()["active"] < 2:
            time.sleep(0.02)
        threads[2].start()
        while s.health()["queued"] < 1:
            time.sleep(0.02)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        s.proc.send_signal(signal.SIGTERM)         # 2 running, 1 queued: ~2 x 0.8 s of work left
        for th in threads:
            th.join(60)
        assert s.proc.wait(30) == 0
        assert sorted(results) == [0, 1, 2]
        for i, (code, out) in results.items():
            assert code == 200 and out["choices"] == alone[i]["choices"] and out["usage"] == alone[i]["usage"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.stop()
