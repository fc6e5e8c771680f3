"""`llmctl serve` under load: 1, 4 and 16 concurrent clients against the same requests sent one
at a time, on an OPT-125m-shaped model (built from its config: the real one's compute, no
download), through the official `openai` client. Two servers: the fp32 model (transformers,
dynamic batching) and its OpenVINO INT8-weights copy as `quantize` writes it (openvino-genai,
continuous batching).

For each server and level: requests completed (must be all), p50 / p95 latency, and aggregate
generated tokens/s with its ratio to that server's one-at-a-time rate measured in the same run.
The levels interleave round by round, because this machine's speed drifts by +-20% within a
minute. Usage:

    python scripts/bench_serve.py [--requests 16] [--tokens 32] [--rounds 2] [--models fp32]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
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


def start_server(model: Path, recipe: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "LLMCTL_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(recipe), "--model",
                             str(model), "--port", "0"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if " at " not in line:
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


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
    latencies = sorted(r[0] for r in results)
    return {"completed": len(results), "wall": wall, "tokens": sum(r[1] for r in results),
            "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="fp32,openvino",
                        help="comma-separated: fp32 (transformers), openvino (openvino-genai)")
    args = parser.parse_args()
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
