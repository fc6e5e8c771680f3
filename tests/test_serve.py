"""`llmctl serve`: a real server in a subprocess, spoken to with the official `openai` client
(and raw HTTP for what a client library would not send)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from llmctl.schema import GenerateConfig
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # each test talks to a server process

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tiny_lm, tmp_path_factory):
    """The tiny fixture model with a chat template."""
    from llmctl.models import load_tokenizer

    folder = shutil.copytree(tiny_lm, tmp_path_factory.mktemp("serve") / "chatty")
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_model_openvino(chat_model, tmp_path_factory):
    """The chat model as `quantize` writes an OpenVINO INT8-weights model: with its tokenizer
    as OpenVINO IR, so `serve` decodes it in openvino-genai's continuous-batching pipeline."""
    pytest.importorskip("openvino_genai")
    from llmctl import quantization
    from llmctl.models import load_causal_lm, load_tokenizer

    chosen = {"backend": "openvino", "method": "weight", "bits": 8, "group_size": -1,
              "sym": False}
    folder = tmp_path_factory.mktemp("serve-ov") / "chatty"
    qmodel = quantization.quantize(load_causal_lm(str(chat_model)), str(chat_model), chosen)
    quantization.save(qmodel, chosen, folder, load_tokenizer(str(chat_model)))
    return folder


def start(model, tmp_path, api_key=None):
    recipe = tmp_path / "serve.toml"
    recipe.write_text('[run]\nname = "serve"\n')
    env = {k: v for k, v in os.environ.items() if k != "LLMCTL_API_KEY"}
    if api_key:
        env["LLMCTL_API_KEY"] = api_key
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(recipe), "--model",
                             str(model), "--port", "0"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()  # "serving NAME (PATH) at http://127.0.0.1:PORT/v1 (ENGINE..."
    assert line.startswith("serving chatty"), (line, proc.stderr.read() if proc.poll() else "")
    url = line.split(" at ")[1].split()[0]
    assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    return proc, url, line


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


ENGINES = {"transformers": "transformers, dynamic batching",
           "openvino": "openvino-genai, continuous batching"}


@pytest.fixture(scope="module", params=list(ENGINES))
def served(request, tmp_path_factory):
    """The model a server answers from: the fp chat model (transformers) or its OpenVINO copy."""
    return request.param, request.getfixturevalue(
        "chat_model" if request.param == "transformers" else "chat_model_openvino")


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    engine, model = served
    proc, url, line = start(model, tmp_path_factory.mktemp("server"))
    assert f"({ENGINES[engine]}, up to 16 sequences at once, 64 more requests waiting, " \
        "bodies up to 1048576 bytes)" in line
    yield url
    assert stop(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(served):
    """What `llmctl generate` answers, in this process: the server must say the same (for the
    OpenVINO model, generate decodes in openvino-genai's LLMPipeline, one request alone)."""
    from llmctl.models import load_tokenizer
    from llmctl.quantization import load_model
    from llmctl.stages.generate import generate

    model = load_model(str(served[1])).eval()
    tokenizer = load_tokenizer(str(served[1]), padding_side="left")

    def greedy(text: str, max_tokens: int, chat: bool = False) -> str:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        return generate(model, tokenizer, text, GenerateConfig(max_new_tokens=max_tokens))[0][0]

    return greedy


def test_completions_match_generate_and_stream_the_same_text(client, reference):
    assert [m.id for m in client.models.list()] == ["chatty"]
    expected = reference("The function returns", 8)
    done = client.completions.create(model="chatty", prompt="The function returns",
                                     max_tokens=8, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > 0
    stream = client.completions.create(model="chatty", prompt="The function returns",
                                       max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_uses_the_models_template(client, reference):
    expected = reference("Hello there", 6, chat=True)
    done = client.chat.completions.create(
        model="chatty", messages=[{"role": "user", "content": "Hello there"}], max_tokens=6,
        temperature=0)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="chatty", messages=[{"role": "user", "content": "Hello there"}], max_tokens=6,
        temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_stop_n_and_seed(client, reference):
    full = reference("The function returns", 12)
    stop = full[len(full) // 2:][:2]
    done = client.completions.create(model="chatty", prompt="The function returns",
                                     max_tokens=12, temperature=0, stop=[stop])
    assert done.choices[0].text == full[:full.index(stop)]
    assert done.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="chatty", prompt="The function returns",
                                         max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]

    def sample(seed):
        out = client.completions.create(model="chatty", prompt=["The", "Profit"], max_tokens=6,
                                        temperature=1.5, n=2, seed=seed)
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(7)
    assert len(first) == 4 and first == sample(7) and first != sample(8)


def test_clients_that_leave_mid_stream_do_not_stall_the_server(client, server, reference):
    expected = reference("The function returns", 8)
    for _ in range(3):  # each reads one event and hangs up: its decode is dropped
        with httpx.stream("POST", f"{server}/completions", json={
                "model": "chatty", "prompt": "The", "max_tokens": 50, "temperature": 0,
                "stream": True}) as response:
            assert next(response.iter_lines()).startswith("data: ")
    done = client.completions.create(model="chatty", prompt="The function returns",
                                     max_tokens=8, temperature=0)
    assert done.choices[0].text == expected


def test_bad_requests_are_400_with_a_json_error(client, server):
    import openai

    for bad, param in [({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"),
                       ({"prompt": "word " * 500}, "prompt"), ({"logprobs": 2}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{"model": "chatty", "prompt": "Hi", **bad})
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="Hi")
    raw = httpx.post(f"{server}/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    assert httpx.post(f"{server}/chat/completions", json={"messages": []}).status_code == 400
    # max_tokens beyond the context is refused; left out, it is capped to the context
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="chatty", prompt="Hi", max_tokens=64, temperature=0)
    assert err.value.body["param"] == "max_tokens"
    capped = client.chat.completions.create(
        model="chatty", messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert capped.usage.prompt_tokens + capped.usage.completion_tokens <= 64


def test_concurrent_requests_are_batched_and_all_answered(client, server, reference):
    """Requests that arrive together decode together (different prompts and lengths, some
    streamed), and each answer is what it is alone."""
    asks = [("The quick brown fox", 10), ("Profit", 4), ("The function returns the", 7)]
    expected = {ask: reference(*ask) for ask in asks}
    answers, errors = [], []

    def ask(i: int):
        prompt, tokens = asks[i % len(asks)]
        try:
            if i % 4 == 3:
                chunks = client.completions.create(model="chatty", prompt=prompt, stream=True,
                                                   max_tokens=tokens, temperature=0)
                text = "".join(c.choices[0].text for c in chunks)
            else:
                done = client.completions.create(model="chatty", prompt=prompt,
                                                 max_tokens=tokens, temperature=0)
                assert done.usage.completion_tokens <= tokens  # each row its own length
                text = done.choices[0].text
            answers.append(((prompt, tokens), text))
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(err)

    health = server.removesuffix("/v1") + "/health"
    before = httpx.get(health).json()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(answers) == 12
    assert all(text == expected[key] for key, text in answers), answers
    after = httpx.get(health).json()
    assert after["batches"] > before["batches"] and after["largest_batch"] > 1


def test_api_key_and_graceful_sigterm(chat_model, tmp_path):
    import openai

    proc, url, _ = start(chat_model, tmp_path, api_key="s3cret-key")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/models").status_code == 401
        authed = openai.OpenAI(base_url=url, api_key="s3cret-key", max_retries=0)
        assert [m.id for m in authed.models.list()] == ["chatty"]

        # SIGTERM while a request is being answered: it finishes, then the server exits 0.
        result = {}
        worker = threading.Thread(target=lambda: result.update(answer=authed.completions.create(
            model="chatty", prompt="The", max_tokens=40, temperature=0)))
        worker.start()
        health = url.removesuffix("/v1") + "/health"
        deadline = time.time() + 30
        while httpx.get(health).json()["in_flight"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        assert result["answer"].usage.completion_tokens == 40
        assert proc.wait(timeout=60) == 0
        assert "s3cret-key" not in proc.stdout.read() + proc.stderr.read()  # never logged
    finally:
        stop(proc)


def test_taken_port_is_exit_2(chat_model, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        recipe = tmp_path / "serve.toml"
        recipe.write_text('[run]\nname = "serve"\n')
        out = subprocess.run([sys.executable, "-m", "llmctl", "serve", str(recipe), "--model",
                              str(chat_model), "--port", str(port)], cwd=REPO, text=True,
                             capture_output=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: --host 127.0.0.1 --port {port}")


