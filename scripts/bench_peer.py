"""llmctl's fastest CPU path against llama.cpp on the same weights, same machine, same prompts.

From one model (a Hugging Face directory or a .gguf, imported by llmctl) the script builds, with
llmctl's own quantize backends, an OpenVINO INT8 and INT4 model (what `quantize` writes, decoded
by openvino-genai) and GGUF q8_0 and q4_0 exports (decoded by llama.cpp through
llama-cpp-python), then measures, rounds interleaved, medians over ``--rounds``:

1. batch 1, greedy, forced lengths (``--tokens``, 128 and 512): tokens/s and time to first token
   for a 32-token prompt, each runtime through llmctl's own timing (``llmctl.latency``); the
   variants of one length run back to back in an order that alternates between rounds, and the
   ratios are the median of each round's own ratio (this machine drifts by +-20% a minute);
2. ``llmctl serve`` against ``llama_cpp.server`` at ``--clients`` (1, 4, 16) concurrent streaming
   clients on /v1/completions, greedy, ``--serve-tokens`` each: aggregate tokens/s (completion
   tokens counted with the model's tokenizer), p50/p95 request latency, requests lost.

Prints a table and the ratios (llmctl / llama.cpp) at comparable bits: INT8 against q8_0, INT4
against q4_0. The machine's load average is recorded with every figure. Usage:

    python scripts/bench_peer.py --model runs/smollm2-tweets/dpo/adapter --workdir /tmp/peer [--rounds 5]
        [--tokens 128 512] [--clients 1 4 16] [--serve-tokens 64] [--json peer.json]

Needs the ``llamacpp`` extra, and for the server llama-cpp-python's ``server`` extra (its
packages may sit in a separate directory given by ``--server-path``, put on the server's
PYTHONPATH only).
"""

from __future__ import annotations

from llmctl.env import quiet_libraries

quiet_libraries()  # before transformers is imported

import argparse  # noqa: E402
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmctl import quantization
from llmctl.latency import generate_seconds, prompt_ids
from llmctl.models import load_tokenizer
from llmctl.quantization import load_model

# name -> llmctl quantize settings; pairs compared at comparable bits
VARIANTS = {
    "openvino int8": {"backend": "openvino", "method": "weight", "bits": 8, "group_size": -1,
                      "sym": False},
    "openvino int4": {"backend": "openvino", "method": "weight", "bits": 4, "group_size": 128,
                      "sym": True, "ratio": 1.0},
    "gguf q8_0": {"backend": "gguf", "method": "q8_0"},
    "gguf q4_0": {"backend": "gguf", "method": "q4_0"},
}
PAIRS = [("openvino int8", "gguf q8_0"), ("openvino int4", "gguf q4_0")]
PROMPTS = [  # distinct prompts, so no server reuses another request's prompt cache
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "List five ideas for a weekend trip near the mountains and say why each is fun.",
    "Describe the water cycle to a ten-year-old.",
    "What are the pros and cons of working from home? Answer in detail.",
    "Write a letter to a friend about learning to play the guitar.",
    "Summarize the plot of a detective novel you would like to read.",
    "Give advice to someone starting their first job in a busy restaurant.",
]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def prepare(model: str, workdir: Path, names: list[str]) -> dict[str, Path]:
    """Each variant built once with llmctl's quantize backends (kept in ``workdir``)."""
    out = {}
    source = None
    for name in names:
        settings = VARIANTS[name]
        folder = workdir / name.replace(" ", "-")
        if not (folder / quantization.MARKER).is_file():
            if source is None:  # as the quantize stage does: an adapter merged, on disk
                fp, tokenizer = quantization.fp_model(model)
                source = fp, tokenizer, quantization.source_dir(model, fp, tokenizer,
                                                                workdir / "fp-merged")
            t0 = time.perf_counter()
            qmodel = quantization.quantize(source[0], source[2], settings)
            quantization.save(qmodel, settings, folder, source[1])
            print(f"  built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = folder
    return out


def round_order(names: list[str], r: int) -> list[str]:
    """The variants' order in round ``r``: reversed every other round, so that no runtime always
    runs first (or straight after the same one) while the machine drifts."""
    return list(names) if r % 2 == 0 else list(reversed(names))


def paired_ratio(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """llmctl's speed over llama.cpp's from seconds measured in the same rounds: each round's
    ratio (their seconds / ours), then the median and range of those. Within a round the two ran
    seconds apart, so the ratio drifts far less than either figure (this machine's speed moves
    by +-20% within a minute)."""
    ratios = [t / o for o, t in zip(ours, theirs)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "rounds": len(ratios)}


def batch1(paths: dict[str, Path], tokens: list[int], rounds: int) -> dict:
    """Seconds for each forced length and for one token, every variant in each round; the
    variants of one length run back to back, in an order that alternates between rounds."""
    models = {name: load_model(str(path)) for name, path in paths.items()}
    tokenizer = load_tokenizer(str(next(iter(paths.values()))))
    ids = prompt_ids(tokenizer, 32, 1)
    pad = tokenizer.pad_token_id or 0
    times = {(name, n): [] for name in models for n in tokens + [1]}
    loads = []
    for name, model in models.items():  # warm-up
        generate_seconds(model, ids, 8, 1, pad)
    for r in range(rounds):
        loads.append(load_average())
        for n in tokens + [1]:
            for name in round_order(list(models), r):
                times[(name, n)].append(generate_seconds(models[name], ids, n, 1, pad))
        print(f"  round {r + 1}: " + "; ".join(
            f"{name} " + ", ".join(f"{n} tok {times[(name, n)][-1]:.2f} s" for n in tokens)
            for name in models), flush=True)
    result = {name: {"ttft_seconds": statistics.median(times[(name, 1)]),
                     **{f"tokens_per_second_{n}": n / statistics.median(times[(name, n)])
                        for n in tokens}} for name in models}
    ratios = {f"{ours} / {theirs}": {str(n): paired_ratio(times[(ours, n)], times[(theirs, n)])
                                     for n in tokens + [1]}
              for ours, theirs in PAIRS if ours in models and theirs in models}
    return {"results": result, "paired_ratios": ratios, "load_averages": loads,
            "seconds": {f"{name} {n}": times[(name, n)] for name, n in times}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(name: str, path: Path, server_path: str | None, workdir: Path):
    """(process, base URL) of llmctl serve (OpenVINO) or llama_cpp.server (GGUF)."""
    port = free_port()
    env = dict(os.environ)
    if VARIANTS[name]["backend"] == "gguf":
        if server_path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"),
                                                                server_path]))
        from llmctl.quantization.llamacpp import threads

        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(path / "model.gguf"),
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads()),
                "--n_threads_batch", str(threads()), "--n_ctx", "4096",
                # Its default cuts the request in progress short when another arrives: the
                # concurrent clients would get empty answers instead of waiting their turn.
                "--interrupt_requests", "False"]
    else:
        recipe = workdir / "serve.toml"
        recipe.write_text('[run]\nname = "peer"\n')
        args = [sys.executable, "-m", "llmctl", "serve", str(recipe), "--model", str(path),
                "--port", str(port)]
    log = open(workdir / f"{name.replace(' ', '-')}-server.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the {name} server exited (see {log.name})")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"error: the {name} server did not start in 10 minutes (see {log.name})")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int
                      ) -> tuple[float, float, str]:
    """(seconds to the last byte, seconds to the first text, the streamed text)."""
    start = time.perf_counter()
    first, text = None, []
    # A chat request: given a bare prompt, the instruct model ends at once (an end-of-turn as
    # its first token, in both servers), and the comparison measured nothing.
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            piece = (choices[0].get("delta") or {}).get("content") or "" if choices else ""
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
    return time.perf_counter() - start, first or float("nan"), "".join(text)


async def load_run(url: str, clients: int, max_tokens: int) -> dict:
    """``clients`` concurrent streaming requests, each client its own prompt."""
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        outcomes = await asyncio.gather(*[
            one_request(client, url, PROMPTS[i % len(PROMPTS)] + f" (request {i})", max_tokens)
            for i in range(clients)], return_exceptions=True)
        wall = time.perf_counter() - start
    # An answer without text is lost too (a server that gave up on it).
    done = [o for o in outcomes if not isinstance(o, BaseException) and o[2]]
    return {"wall": wall, "latencies": [o[0] for o in done], "ttfts": [o[1] for o in done],
            "texts": [o[2] for o in done], "lost": len(outcomes) - len(done)}


def serving(paths: dict[str, Path], clients: list[int], max_tokens: int, rounds: int,
            server_path: str | None, workdir: Path) -> dict:
    tokenizer = load_tokenizer(str(next(iter(paths.values()))))
    servers = {name: start_server(name, path, server_path, workdir)
               for name, path in paths.items()}
    runs: dict = {(name, c): [] for name in paths for c in clients}
    loads = []
    try:
        for name, (_, url) in servers.items():  # warm-up
            asyncio.run(load_run(url, 1, 8))
        for r in range(rounds):
            loads.append(load_average())
            for c in clients:
                for name, (_, url) in servers.items():
                    run = asyncio.run(load_run(url, c, max_tokens))
                    run["tokens"] = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                        for t in run["texts"])
                    runs[(name, c)].append(run)
                    print(f"  round {r + 1} {name} {c} clients: {run['tokens']} tokens in "
                          f"{run['wall']:.1f} s, lost {run['lost']}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    result = {}
    for (name, c), found in runs.items():
        latencies = sorted(x for run in found for x in run["latencies"])
        result.setdefault(name, {})[str(c)] = {
            "tokens_per_second": statistics.median(run["tokens"] / run["wall"] for run in found),
            "p50_seconds": statistics.median(latencies),
            "p95_seconds": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "ttft_p50_seconds": statistics.median(x for run in found for x in run["ttfts"]),
            "lost": sum(run["lost"] for run in found)}
    return {"results": result, "load_averages": loads}


def print_tables(b1: dict, served: dict, tokens: list[int], clients: list[int]) -> None:
    if b1:
        print_batch1(b1, tokens)
    if served:
        print_serving(served, clients)


def print_batch1(b1: dict, tokens: list[int]) -> None:
    print(f"\nbatch 1, greedy, 32-token prompt (load averages {b1['load_averages']}):")
    print("| runtime | " + " | ".join(f"tok/s {n}" for n in tokens) + " | first token (ms) |")
    print("|---|" + "---:|" * (len(tokens) + 1))
    for name, r in b1["results"].items():
        print(f"| {name} | " + " | ".join(f"{r[f'tokens_per_second_{n}']:.1f}" for n in tokens)
              + f" | {r['ttft_seconds'] * 1000:.0f} |")
    for pair, per_length in b1.get("paired_ratios", {}).items():
        print(f"  {pair}, median of each round's ratio (range): " + ", ".join(
            f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) at {n} tokens"
            for n, r in per_length.items() if n != "1")
            + f"; first token {per_length['1']['median']:.2f}x sooner")


def print_serving(served: dict, clients: list[int]) -> None:
    print(f"\nserving, streaming clients (load averages {served['load_averages']}):")
    print("| server | clients | aggregate tok/s | p50 latency (s) | p95 latency (s) | "
          "p50 first text (s) | lost |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, per in served["results"].items():
        for c in clients:
            r = per[str(c)]
            print(f"| {name} | {c} | {r['tokens_per_second']:.1f} | {r['p50_seconds']:.2f} | "
                  f"{r['p95_seconds']:.2f} | {r['ttft_p50_seconds']:.2f} | {r['lost']} |")
    for ours, theirs in PAIRS:
        if ours in served["results"] and theirs in served["results"]:
            print(f"  {ours} / {theirs} aggregate tok/s: " + ", ".join(
                f"{served['results'][ours][str(c)]['tokens_per_second'] / served['results'][theirs][str(c)]['tokens_per_second']:.2f}x"  # noqa: E501
                f" at {c}" for c in clients))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory, adapter (a dpo or "
                        "sft output) or .gguf to quantize")
    parser.add_argument("--workdir", help="where the variants are built and kept (default: a "
                                          "temporary directory, deleted at the end)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--serve-tokens", type=int, default=64,
                        help="max_tokens of each served request")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--only", choices=["batch1", "serve"], help="one of the two parts")
    parser.add_argument("--server-path", help="a directory with llama_cpp.server's own "
                                              "packages, added to its PYTHONPATH only")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    from llmctl.quantization.llamacpp import available

    if not available():
        parser.error("llama-cpp-python is not installed: make install-llamacpp "
                     "(its CMAKE_ARGS for this CPU: docs/quantization.md)")
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load_average()}")
        paths = prepare(args.model, workdir, args.variants)
        b1, served = {}, {}
        if args.only != "serve":
            print(f"batch 1, greedy, forced {args.tokens} tokens, median of {args.rounds}:")
            b1 = batch1(paths, args.tokens, args.rounds)
        if args.only != "batch1":
            print(f"serving: {args.clients} streaming clients, {args.serve_tokens} tokens each, "
                  f"median of {args.rounds}:")
            served = serving(paths, args.clients, args.serve_tokens, args.rounds,
                             args.server_path, workdir)
        print_tables(b1, served, args.tokens, args.clients)
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "batch1": b1,
                                                   "serving": served}, indent=2) + "\n")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
