"""`llmctl serve` under load, two modes.

Throughput (the default): 1, 4 and 16 concurrent clients against the same requests sent one
at a time, on an OPT-125m-shaped model (built from its config: the real one's compute, no
download), through the official `openai` client. Two servers: the fp32 model (transformers,
dynamic batching) and its OpenVINO INT8-weights copy as `quantize` writes it (openvino-genai,
continuous batching). For each server and level: requests completed (must be all), p50 / p95
latency, and aggregate generated tokens/s with its ratio to that server's one-at-a-time rate
measured in the same run. The levels interleave round by round, because this machine's speed
drifts by +-20% within a minute.

Soak (``--soak SECONDS``): 16 clients stream completions back to back for that long from one
server (the demo model by default: the demo's pretrain shape with its tokenizer, untrained;
``--model`` serves another), then the server gets SIGTERM while they are mid-request. Reports
requests done and lost (a request is lost unless it streams to its finish_reason, or is
refused with 503 and Retry-After after the SIGTERM), p50 / p95 latency and time to first
token, the server's resident memory (RSS) after the first minute (a quarter of a shorter
soak) and at the end, and the drain: a request sent after the SIGTERM gets 503, the ones in
flight finish, the server exits 0. Usage:

    python scripts/bench_serve.py [--requests 16] [--tokens 32] [--rounds 2] [--models fp32]
    python scripts/bench_serve.py --soak 600 [--clients 16] [--tokens 32] [--json soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).parents[1]
PROMPTS = ["The quarterly report shows that revenue", "Shares of the bank rose after",
           "The function returns the value of", "Profit fell as costs climbed and"]


def build_model(folder: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from llmctl.demo.assets import train_tokenizer
    from llmctl.models import load_tokenizer, save_model

    train_tokenizer(folder, PROMPTS * 50)
    tokenizer = load_tokenizer(str(folder))
    torch.manual_seed(0)
    # facebook/opt-125m's shape (12 layers, 768 wide) with the small tokenizer's vocabulary.
    config = OPTConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    save_model(OPTForCausalLM(config).eval(), tokenizer, folder)


def openvino_copy(model: Path, out: Path) -> None:
    from llmctl import quantization
    from llmctl.models import load_causal_lm, load_tokenizer

    chosen = {"backend": "openvino", "method": "weight", "bits": 8, "group_size": -1,
              "sym": False}
    qmodel = quantization.quantize(load_causal_lm(str(model)), str(model), chosen)
    quantization.save(qmodel, chosen, out, load_tokenizer(str(model)))


def demo_model(folder: Path, tokenizer: Path | None) -> None:
    """The demo's model as `llmctl demo` pretrains it (its [pretrain] architecture and config),
    untrained: decoding costs the same. With the demo assets' tokenizer (built if not given)."""
    import tomllib

    from llmctl.demo.assets import build_assets
    from llmctl.models import build_causal_lm, load_tokenizer, save_model

    if tokenizer is None:
        tokenizer = Path(build_assets(folder.parent / "assets", seed=0)["tokenizer"])
    pretrain = tomllib.loads((REPO / "llmctl/demo/demo.toml").read_text())["pretrain"]
    loaded = load_tokenizer(str(tokenizer))
    model = build_causal_lm(pretrain["architecture"], pretrain["config"], loaded,
                            pretrain["seq_len"])
    save_model(model.eval(), loaded, folder)


def start_server(model: Path, recipe: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMCTL_API_KEY",
                                                            "LLMCTL_API_KEY_FILE")}
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(recipe), "--model",
                             str(model), "--port", "0"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if " at " not in line:
        raise SystemExit(f"server did not start: {line!r}")
    # Keep reading its stdout (uvicorn's access log): once a pipe nobody reads holds 64 KiB,
    # the server's next log line blocks its event loop, and every request with it (a minute's
    # soak logs more than that).
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    return proc, line.split(" at ")[1].split()[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(client, clients: int, requests: int, tokens: int) -> dict:
    """``requests`` completions from ``clients`` threads at once."""
    def one(i: int):
        t0 = time.perf_counter()
        out = client.completions.create(model="model", prompt=PROMPTS[i % len(PROMPTS)],
                                        max_tokens=tokens, temperature=0)
        return time.perf_counter() - t0, out.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    latencies = [r[0] for r in results]
    return {"completed": len(results), "wall": wall, "tokens": sum(r[1] for r in results),
            "p50": statistics.median(latencies),
            "p95": percentile(latencies, 0.95)}


def rss_bytes(pid: int) -> int:
    """A process's resident memory, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "unknown CPU"


def soak(url: str, proc: subprocess.Popen, seconds: float, clients: int, tokens: int) -> dict:
    """``clients`` threads stream completions back to back for ``seconds``, then SIGTERM."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=120)
    stop, sigterm = threading.Event(), threading.Event()
    done: list[tuple[float, float]] = []  # (latency, time to first token) of each answered one
    refused, lost = [], []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        first, finish = None, None
        try:
            for chunk in client.completions.create(
                    model="model", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens,
                    temperature=0, stream=True):
                first = first or time.perf_counter()
                finish = chunk.choices[0].finish_reason or finish
        except openai.APIStatusError as err:
            if sigterm.is_set() and err.status_code == 503 and err.response.headers.get(
                    "retry-after"):
                refused.append(i)
                return
            lost.append(f"HTTP {err.status_code}: {err.message}")
            return
        except Exception as err:  # noqa: BLE001 - a lost request, reported
            lost.append(f"{type(err).__name__}: {err}")
            return
        if finish is None:
            lost.append("the stream ended without a finish_reason")
        else:
            done.append((time.perf_counter() - t0, first - t0))

    def client_loop(c: int) -> None:
        i = c
        while not stop.is_set():
            one(i)
            i += clients

    health_waits: list[float] = []  # how long /health took, asked every half second

    def probe_health() -> None:
        while not stop.is_set() and not sigterm.is_set():
            t = time.perf_counter()
            try:
                httpx.get(health, timeout=60)
                health_waits.append(time.perf_counter() - t)
            except httpx.HTTPError:
                health_waits.append(float("inf"))
            time.sleep(0.5)

    health = url.removesuffix("/v1") + "/health"
    warm_at = min(60.0, seconds / 4)
    rss: list[tuple[float, int]] = []
    load_start = os.getloadavg()
    # Daemon threads: a failure of this script's own (below) must not leave it waiting on them.
    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True)
               for c in range(clients)]
    threads.append(threading.Thread(target=probe_health, daemon=True))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while (elapsed := time.perf_counter() - t0) < seconds:
        rss.append((elapsed, rss_bytes(proc.pid)))
        time.sleep(min(1.0, max(seconds - elapsed, 0)))
    rss_end = rss_bytes(proc.pid)
    # 60 s, not httpx's 5: a slow answer on 2 loaded cores shows in health_max_s, not as a crash.
    state = httpx.get(health, timeout=60).json()
    load_end = os.getloadavg()
    answered_before = len(done)
    # The drain: SIGTERM with every client mid-request; a new request must get 503.
    proc.send_signal(signal.SIGTERM)
    sigterm.set()
    probe = httpx.post(f"{url}/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    stop.set()
    for t in threads:
        t.join()
    rc = proc.wait(timeout=120)
    latencies, firsts = [d[0] for d in done], [d[1] for d in done]
    rss_warm = next(r for t, r in rss if t >= warm_at) if rss[-1][0] >= warm_at else rss[-1][1]
    return {
        "seconds": seconds, "clients": clients, "tokens": tokens, "cpu": cpu_name(),
        "load_average_start": load_start, "load_average_end": load_end,
        "requests_done": len(done), "requests_lost": len(lost), "lost": lost[:10],
        "requests_per_second": answered_before / seconds,
        "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95),
        "first_token_p50_s": statistics.median(firsts),
        "first_token_p95_s": percentile(firsts, 0.95),
        "health_p50_s": statistics.median(health_waits), "health_max_s": max(health_waits),
        "rss_warm_at_s": warm_at, "rss_warm_bytes": rss_warm, "rss_end_bytes": rss_end,
        "rss_max_bytes": max(r for _, r in rss), "rss_growth": rss_end / rss_warm - 1,
        "batches": state["batches"], "largest_batch": state["largest_batch"],
        "drain": {"in_flight_at_sigterm": state["in_flight"],
                  "answered_after_sigterm": len(done) - answered_before,
                  "refused_after_sigterm": len(refused), "probe_status": probe.status_code,
                  "probe_retry_after": probe.headers.get("retry-after"), "exit_code": rc}}


def soak_main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "serve.toml"
        recipe.write_text('[run]\nname = "soak-serve"\n')
        model = args.model
        if model is None:
            model = Path(tmp) / "demo" / "model"
            model.parent.mkdir()
            demo_model(model, args.tokenizer)
        proc, url = start_server(model, recipe)
        try:
            report = soak(url, proc, args.soak, args.clients, args.tokens)
        finally:
            if proc.poll() is None:
                proc.kill()
    mib = 1 << 20
    print(f"soak: {report['clients']} streaming clients x {report['seconds']:.0f} s, "
          f"{report['tokens']} tokens each, {report['cpu']}, load average "
          f"{report['load_average_start'][0]:.2f} -> {report['load_average_end'][0]:.2f}\n"
          f"  requests done {report['requests_done']}, lost {report['requests_lost']} "
          f"{report['lost']}, {report['requests_per_second']:.2f}/s\n"
          f"  latency p50 {report['p50_s']:.2f} s, p95 {report['p95_s']:.2f} s; first token "
          f"p50 {report['first_token_p50_s']:.2f} s, p95 {report['first_token_p95_s']:.2f} s; "
          f"/health p50 {report['health_p50_s']:.3f} s, max {report['health_max_s']:.2f} s\n"
          f"  server RSS after {report['rss_warm_at_s']:.0f} s "
          f"{report['rss_warm_bytes'] / mib:.1f} MiB, at the end "
          f"{report['rss_end_bytes'] / mib:.1f} MiB ({report['rss_growth']:+.1%}), max "
          f"{report['rss_max_bytes'] / mib:.1f} MiB\n"
          f"  drain: {report['drain']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="fp32,openvino",
                        help="comma-separated: fp32 (transformers), openvino (openvino-genai)")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="run the soak for this long instead of the throughput levels")
    parser.add_argument("--clients", type=int, default=16, help="soak: concurrent clients")
    parser.add_argument("--model", type=Path, help="soak: the model to serve (default: the "
                        "demo's shape, untrained)")
    parser.add_argument("--tokenizer", type=Path, help="soak: the demo tokenizer, if built "
                        "(default: build the demo assets)")
    parser.add_argument("--json", help="soak: also write the report here")
    args = parser.parse_args()
    if args.soak:
        return soak_main(args)
    import openai

    names = args.models.split(",")
    levels = (1, 4, 16)
    runs = {(name, c): [] for name in names for c in levels}
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "serve.toml"
        recipe.write_text('[run]\nname = "bench-serve"\n')
        models = {"fp32": Path(tmp) / "model", "openvino": Path(tmp) / "openvino" / "model"}
        models["fp32"].mkdir()
        build_model(models["fp32"])
        if "openvino" in names:
            openvino_copy(models["fp32"], models["openvino"])
        servers = {name: start_server(models[name], recipe) for name in names}
        try:
            clients = {name: openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
                       for name, (_, url) in servers.items()}
            for name, client in clients.items():
                load(client, 1, 2, 4)  # warm-up
                engines[name] = httpx.get(servers[name][1].removesuffix("/v1") + "/health"
                                          ).json()["engine"]
            for r in range(args.rounds):  # one server decodes at a time; rounds interleave
                for name, client in clients.items():
                    for c in levels:
                        runs[name, c].append(load(client, c, args.requests, args.tokens))
                        print(f"  round {r + 1}, {name}, {c} client(s): "
                              f"{runs[name, c][-1]['wall']:.1f} s", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)

    def tps(run):
        return run["tokens"] / run["wall"]

    base_fp32 = statistics.median(tps(run) for run in runs[names[0], 1])
    print(f"\n{args.requests} greedy requests of {args.tokens} tokens, OPT-125m shape, "
          f"{args.rounds} rounds (medians)")
    print(f"| model (engine) | clients | completed | p50 s | p95 s | tokens/s | vs one at a time "
          f"| vs {names[0]} one at a time |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        base = statistics.median(tps(run) for run in runs[name, 1])
        for c in levels:
            done = min(run["completed"] for run in runs[name, c])
            p50 = statistics.median(run["p50"] for run in runs[name, c])
            p95 = statistics.median(run["p95"] for run in runs[name, c])
            rate = statistics.median(tps(run) for run in runs[name, c])
            print(f"| {name} ({engines[name]}) | {c} | {done}/{args.requests} | {p50:.2f} | "
                  f"{p95:.2f} | {rate:.1f} | {rate / base:.2f}x | {rate / base_fp32:.2f}x |")


if __name__ == "__main__":
    main()
