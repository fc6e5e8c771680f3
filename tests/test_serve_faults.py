"""`llmctl serve` under load, faults and hostile requests, in real server processes: a soak of
16 streaming clients ended by SIGTERM (through `scripts/bench_serve.py --soak`), the bounded
queue, clients that hang up, the drain, and requests no client library would send."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # each test talks to a server process

KEY = "k3y-for-the-fault-tests"
# The model's context: long enough that a request of most of it decodes for many seconds
# however fast the machine, so that the tests can hold requests in flight.
POSITIONS = 4096


@pytest.fixture(scope="module")
def long_lm(tiny_lm, tmp_path_factory):
    """The tiny fixture model's shape and tokenizer with 4096 positions (random weights whose
    greedy continuation of "The" runs 4000 tokens without an eos)."""
    import torch

    from llmctl.models import build_causal_lm, load_tokenizer, save_model

    tokenizer = load_tokenizer(str(tiny_lm))
    torch.manual_seed(0)
    model = build_causal_lm("opt", {
        "num_hidden_layers": 2, "hidden_size": 32, "ffn_dim": 64, "num_attention_heads": 4,
        "max_position_embeddings": POSITIONS, "word_embed_proj_dim": 32, "init_std": 0.05},
        tokenizer, 16)
    folder = tmp_path_factory.mktemp("long") / "long"
    save_model(model.eval(), tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def guarded(long_lm, tmp_path_factory):
    """A server that decodes one sequence at a time and holds at most 3 requests (1 decoding,
    2 waiting), its API key read from a file. The drain test, last in this file, stops it."""
    root = tmp_path_factory.mktemp("guarded")
    (root / "serve.toml").write_text('[run]\nname = "guarded"\n')
    (root / "key").write_text(KEY + "\n")
    env = {k: v for k, v in os.environ.items() if k != "LLMCTL_API_KEY"}
    env["LLMCTL_API_KEY_FILE"] = str(root / "key")
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(root / "serve.toml"),
                             "--model", str(long_lm), "--port", "0", "--max-batch", "1",
                             "--max-queue", "2"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    assert "up to 1 sequences at once, 2 more requests waiting, bodies up to 1048576 bytes" \
        in line, (line, proc.stderr.read() if proc.poll() else "")
    url = line.split(" at ")[1].split()[0]
    yield proc, url
    if proc.poll() is None:  # (the drain test was not run)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert KEY not in proc.stdout.read() + proc.stderr.read()  # the key is never logged


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(url: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    """POST /v1/completions with the key (or ``headers`` instead of it)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/completions", content=raw, timeout=timeout, headers={
        "content-type": "application/json", **(AUTH if headers is None else headers)})


def health(url: str) -> dict:
    return httpx.get(url.removesuffix("/v1") + "/health").json()


def wait_until_idle(url: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while (state := health(url))["in_flight"] or state["queued"]:
        assert time.time() < deadline, state
        time.sleep(0.05)
    return state


def hold(url: str, max_tokens: int) -> tuple:
    """A streamed request whose response has begun (it is held by the server)."""
    stream = httpx.stream("POST", f"{url}/completions", headers=AUTH, timeout=120, json={
        "prompt": "The", "max_tokens": max_tokens, "temperature": 0, "stream": True})
    response = stream.__enter__()
    assert response.status_code == 200
    return stream, response


def is_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["type"] and {"param", "code"} <= set(error)
    return error


def test_hostile_requests_get_4xx_json_errors_and_others_are_still_served(guarded):
    import openai

    _, url = guarded
    prompt_over_context = "The function returns " * 1200  # 4800 tokens > 4096 positions
    cases = [  # (body, status, the param named)
        (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, None),  # over the 1 MiB body limit
        (b'{"prompt": "\xff\xfe caf\xe9"}', 400, None),  # not UTF-8
        (b'{"prompt": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
        (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
        (b'{"prompt": "x", "top_p": Infinity}', 400, "top_p"),
        (b'{"prompt": "x\\ud800"}', 400, "prompt"),  # a lone surrogate: no tokenizer takes it
        ({"prompt": prompt_over_context}, 400, "prompt"),
        ({"prompt": "x" * 2_000_000}, 413, None),
        ({"prompt": "x" * 900_000}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": POSITIONS}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10 ** 30}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
        ({"prompt": "x", "top_p": -1}, 400, "top_p"),
        ({"prompt": "x", "seed": -1}, 400, "seed"),
        ({"prompt": "x", "seed": 2 ** 64}, 400, "seed"),
        ({"prompt": "x", "n": 17}, 400, "n"),
        ({"prompt": ["x"] * 9, "n": 2}, 400, "prompt"),  # 18 completions in one request
        ({"prompt": "x", "stop": "y" * 65}, 400, "stop"),
        ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
        ([{"prompt": "x"}], 400, "body"),
    ]
    for body, status, param in cases:
        error = is_openai_error(post(url, body), status)
        assert error["param"] == param, (body[:80], error)
    for headers in ({}, {"Authorization": "Bearer " + "x" * len(KEY)},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}):
        error = is_openai_error(post(url, {"prompt": "x"}, headers), 401)
        assert error["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    # The hostile batch held nothing and broke nothing: a normal request is answered.
    assert wait_until_idle(url)["status"] == "ok"
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    done = client.completions.create(model="long", prompt="The", max_tokens=5, temperature=0)
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"


def test_a_full_queue_is_429_and_clients_that_leave_free_their_place(guarded):
    import openai

    _, url = guarded
    held = [hold(url, 4000) for _ in range(3)]  # 1 decoding, 2 waiting: the server is full
    first = held[0][1].iter_lines()  # (kept: a dropped iterator closes its connection)
    assert next(first).startswith("data: ")  # the first one is decoding
    state = health(url)
    assert (state["in_flight"], state["queued"], state["max_in_flight"]) == (3, 2, 3)
    # Past the bound every request is refused at once, with Retry-After; none is queued.
    for _ in range(10):
        refused = post(url, {"prompt": "x", "max_tokens": 1})
        error = is_openai_error(refused, 429)
        assert error["code"] == "queue_full" and refused.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).completions.create(
            model="long", prompt="x", max_tokens=1)
    assert health(url)["in_flight"] == 3

    for stream, _ in held:  # three streaming clients hang up mid-stream
        stream.__exit__(None, None, None)
    wait_until_idle(url, timeout=30)
    for _ in range(3):  # three non-streaming clients give up waiting
        with pytest.raises(httpx.TimeoutException):
            post(url, {"prompt": "The", "max_tokens": 4000, "temperature": 0}, timeout=0.3)
    wait_until_idle(url, timeout=30)

    # After six clients left, the server holds as many requests at once as before.
    answers = []

    def ask() -> None:
        answers.append(post(url, {"prompt": "The", "max_tokens": 8, "temperature": 0}))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    assert all(a.json()["usage"]["completion_tokens"] == 8 for a in answers)
    assert wait_until_idle(url)["in_flight"] == 0


def test_sigterm_drains_the_held_requests_refuses_new_ones_and_exits_0(guarded):
    """Last in this file: it stops the module's server."""
    proc, url = guarded
    held = [hold(url, 200) for _ in range(3)]
    results: dict[int, tuple[str, list[str]]] = {}

    def read(i: int, response) -> None:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        results[i] = (events[-1], [json.loads(e)["choices"][0]["finish_reason"]
                                   for e in events[:-1]])

    readers = [threading.Thread(target=read, args=(i, r)) for i, (_, r) in enumerate(held)]
    for t in readers:
        t.start()
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 30
    while (state := httpx.get(url.removesuffix("/v1") + "/health")).status_code == 200:
        assert time.time() < deadline
        time.sleep(0.01)
    assert state.status_code == 503 and state.json()["status"] == "draining"
    refused = post(url, {"prompt": "x", "max_tokens": 1})
    assert is_openai_error(refused, 503)["code"] == "shutting_down"
    assert refused.headers["retry-after"] == "1"
    for t in readers:
        t.join(timeout=120)
    assert proc.wait(timeout=60) == 0
    # Every request held at the SIGTERM streamed to its end (its 200 tokens), then [DONE].
    assert sorted(results) == [0, 1, 2]
    assert all(last == "[DONE]" and reasons[-1] == "length" for last, reasons in results.values())
    log = proc.stderr.read()
    assert "serve: stopped (every request it held was answered)" in log and KEY not in log
    for stream, _ in held:
        stream.__exit__(None, None, None)


def test_soak_16_streaming_clients_then_sigterm(assets, tmp_path):
    """A minute of `scripts/bench_serve.py --soak` on the demo model's shape: no request lost,
    the server's memory flat after its first quarter, /health answering throughout, and the
    SIGTERM drain under load."""
    report_file = tmp_path / "soak.json"
    out = subprocess.run([sys.executable, "scripts/bench_serve.py", "--soak", "60",
                          "--tokenizer", assets["tokenizer"], "--json", str(report_file)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(report_file.read_text())
    print(out.stdout)  # p50 / p95, RSS: shown with -s
    assert report["requests_lost"] == 0, report["lost"]
    assert report["requests_done"] > report["clients"]
    assert report["p50_s"] <= report["p95_s"]
    # Asked every half second: it answers between tokens, never behind the streams' backlog.
    assert report["health_max_s"] < 30, report
    assert report["rss_growth"] <= 0.10, report
    drain = report["drain"]
    assert drain["in_flight_at_sigterm"] > 0 and drain["answered_after_sigterm"] > 0
    assert (drain["probe_status"], drain["probe_retry_after"], drain["exit_code"]) == \
        (503, "1", 0)
