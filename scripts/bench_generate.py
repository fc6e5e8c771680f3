"""Generation speed and quality of every quantization backend against fp32 eager PyTorch.

Measured in one run:

1. the machine's memory read bandwidth, the ceiling of batch-1 decoding;
2. on a model of ``--shape`` built from its config (OPT-125m or the course's OPT-1.3B: the real
   one's compute, random weights, no download): median seconds for ``--tokens`` forced new
   tokens, greedy and 4-beam, for fp32 eager (the baseline), bf16 eager, and each backend as
   `llmctl quantize` builds it, and time to first token for a ``--prompt-tokens`` prompt. The
   rounds interleave the variants, because this machine's speed drifts by +-20% within a minute;
3. on the trained demo model (``runs/demo``, made by ``llmctl demo`` if missing): each
   backend's quality loss against the fp model, perplexity on the held-out sentiment rows and
   accuracy on the demo lm-eval task.

Prints speed-ups (course targets: 2.2x greedy, 3.5x beam), batch-1 tokens/s as a fraction of
bandwidth / weight bytes read per token, and relative quality loss (target: within 1%). Usage:

    python scripts/bench_generate.py [--shape opt-125m|opt-1.3b] [--tokens 256] [--rounds 3]
        [--prompt-tokens 512] [--variants ...] [--no-quality] [--demo-run-dir runs/demo]

Every variant is held in memory at once (the rounds interleave them). Before building, the
script estimates what the chosen variants hold and refuses (exit 2, with the estimate) when it
exceeds the memory available; at the 1.3B shape, where an fp32 copy is 5.3 GB, the default is
the four variants llmctl recommends (DEFAULT_1_3B), which fit a 24 GB machine.
"""

from __future__ import annotations

from llmctl.env import quiet_libraries

quiet_libraries()  # before transformers is imported

import argparse  # noqa: E402
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

from llmctl import quantization
from llmctl.data import token_blocks
from llmctl.evaluation import lm_eval_tasks, perplexity
from llmctl.latency import generate_seconds
from llmctl.models import load_causal_lm, load_tokenizer
from llmctl.recipe import load_recipe

# name -> (quantize settings or a dtype for eager PyTorch, bytes per weight in decoder layers,
# bytes per weight of the output projection): what one decoding step reads.
VARIANTS = {
    "fp32 eager": (torch.float32, 4.0, 4.0),
    "bf16 eager": (torch.bfloat16, 2.0, 2.0),
    "torch dynamic int8": ({"backend": "torch", "method": "dynamic", "bits": 8, "group_size": -1,
                            "sym": True, "fp32_modules": []}, 1.0, 1.0),
    "inc rtn int4 g128": ({"backend": "inc", "method": "rtn", "bits": 4, "group_size": 128,
                           "sym": True}, 0.5, 4.0),
    "openvino fp32": ({"backend": "openvino", "method": "weight", "bits": 16}, 4.0, 4.0),
    "openvino int8": ({"backend": "openvino", "method": "weight", "bits": 8, "group_size": -1,
                       "sym": False}, 1.0, 1.0),
    # Symmetric: no zero point to subtract in the kernel (NNCF's default for INT8 is asymmetric).
    "openvino int8 sym": ({"backend": "openvino", "method": "weight", "bits": 8, "group_size": -1,
                           "sym": True}, 1.0, 1.0),
    "openvino static int8": ({"backend": "openvino", "method": "static", "bits": 8,
                              "group_size": -1, "sym": False, "smooth_quant_alpha": 0.95}, 1.0, 1.0),
    "openvino int4 g128": ({"backend": "openvino", "method": "weight", "bits": 4,
                            "group_size": 128, "sym": True, "ratio": 1.0}, 0.5, 1.0),
    # One scale per output channel: less to read and a simpler kernel than groups of 128.
    "openvino int4 channel": ({"backend": "openvino", "method": "weight", "bits": 4,
                               "group_size": -1, "sym": True, "ratio": 1.0}, 0.5, 1.0),
}
# The same models saved and reopened as `llmctl quantize` leaves them: openvino-genai's C++
# loop decodes them (in generate and bench); the variants above use optimum-intel's generate.
GENAI = " genai"
VARIANTS.update({name + GENAI: VARIANTS[name]
                 for name in ("openvino fp32", "openvino int8", "openvino int8 sym",
                              "openvino int4 g128", "openvino int4 channel")})


# The default at the OPT-1.3B shape: the baseline and llmctl's CPU paths (all 15 variants hold
# about 39 GB there; the kernel killed that run on a 24 GB machine after 7 of them).
DEFAULT_1_3B = ["fp32 eager", "torch dynamic int8", "openvino int8 genai",
                "openvino int4 g128 genai"]


# The models the course measures, by their Hugging Face configs (facebook/opt-125m, opt-1.3b).
SHAPES = {
    "opt-125m": {},
    "opt-1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192,
                 "num_attention_heads": 32, "word_embed_proj_dim": 2048},
}


def weight_counts(shape: str) -> tuple[int, int, int]:
    """(decoder Linear weights, output projection weights, all parameters) of a shape, counted
    on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig(**SHAPES[shape]))
    layers = sum(m.weight.numel() for m in model.model.decoder.layers.modules()
                 if isinstance(m, torch.nn.Linear))
    head = model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # the tied head counted once
    return layers, head, total


def held_bytes(variant: str, counts: tuple[int, int, int]) -> tuple[float, float]:
    """(bytes a built variant holds, extra bytes while it is built): an estimate from its
    bytes per weight. An eager copy wholly in its dtype; otherwise decoder weights and the head
    at the variant's width, the rest (the embeddings) fp32; an OpenVINO variant twice (the model and its compiled copy, or for
    genai the reopened model and openvino-genai's pipeline). Building copies the fp32 model
    (torch, INC) or exports it from disk (OpenVINO: a loaded copy and the traced graph)."""
    layers, head, total = counts
    spec, layer_bytes, head_bytes = VARIANTS[variant]
    weights = layers * layer_bytes + head * head_bytes + (total - layers - head) * 4.0
    fp32 = total * 4.0
    if isinstance(spec, torch.dtype):  # a whole copy in that dtype; fp32 eager is the model
        return (0.0 if spec == torch.float32 else total * spec.itemsize), 0.0
    if spec["backend"] == "openvino":
        return 2 * weights, 2 * fp32
    return weights, fp32


def memory_estimate(variants: list[str], shape: str) -> float:
    """Peak bytes of a run: the fp32 model and the variants built so far, plus what the next
    build takes while it runs; at the end every variant is held (the rounds interleave them)."""
    counts = weight_counts(shape)
    held = peak = counts[2] * 4.0
    for variant in variants:
        holds, building = held_bytes(variant, counts)
        peak = max(peak, held + building)
        held += holds
    return max(peak, held)


def available_memory() -> float:
    """Bytes the kernel says a new allocation can get (MemAvailable), else all of RAM."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return float(info.get("MemAvailable", info["MemTotal"]))


def check_memory(variants: list[str], shape: str, available: float) -> None:
    """Exit 2 with the estimate when the variants would not fit (a benchmark killed by the
    out-of-memory killer after minutes of building says nothing)."""
    need = memory_estimate(variants, shape)
    if need > available:
        print(f"error: --variants: {len(variants)} variants at the {shape} shape hold about "
              f"{need / 2**30:.1f} GiB at once, {available / 2**30:.1f} GiB is available; "
              f"choose fewer (the default at opt-1.3b: {', '.join(DEFAULT_1_3B)})",
              file=sys.stderr)
        raise SystemExit(2)


def read_bandwidth(gib: float = 1.0, trials: int = 7) -> float:
    """Bytes/s reading a large fp32 tensor (a sum is one read per element); the median trial."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def build(variant, fp_model, source_dir: str, calibration: quantization.Calibration):
    spec = VARIANTS[variant][0]
    if isinstance(spec, torch.dtype):
        return fp_model if spec == torch.float32 else _copy_to(fp_model, spec)
    if spec["backend"] == "openvino" and spec["bits"] == 16:
        quantization.decline_openvino_telemetry()
        from optimum.intel import OVModelForCausalLM

        model = OVModelForCausalLM.from_pretrained(source_dir, export=True, load_in_8bit=False)
    else:
        model = quantization.quantize(fp_model, source_dir, spec, calibration)
    return reopened(model, spec) if variant.endswith(GENAI) else model


def reopened(ov_model, spec: dict):
    """An OpenVINO model saved and loaded back as `llmctl quantize` leaves it (openvino-genai
    then decodes it)."""
    from llmctl.quantization.openvino import OpenVino

    saved = Path(tempfile.mkdtemp(prefix="bench-genai-"))
    atexit.register(shutil.rmtree, saved, ignore_errors=True)
    ov_model.save_pretrained(str(saved))
    return OpenVino().load(saved, spec)


def build_all(variants: list[str], fp_model, source_dir: str, calibration) -> dict:
    """Each variant once; a genai variant saves the optimum-intel variant of the same name
    when that one is built too (an OpenVINO export of a 1.3B model takes minutes)."""
    models = {}
    for variant in variants:
        t0 = time.perf_counter()
        base = variant.removesuffix(GENAI)
        if variant.endswith(GENAI) and base in models:
            models[variant] = reopened(models[base], VARIANTS[variant][0])
        else:
            models[variant] = build(variant, fp_model, source_dir, calibration)
        print(f"  built {variant} in {time.perf_counter() - t0:.1f} s", flush=True)
    return models


def _copy_to(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def speed(args, bandwidth: float) -> dict:
    torch.manual_seed(0)
    config = OPTConfig(**SHAPES[args.shape])  # 50,272-token vocabulary, 2,048 positions
    model = OPTForCausalLM(config).eval()
    layer_weights = sum(m.weight.numel() for m in model.model.decoder.layers.modules()
                        if isinstance(m, torch.nn.Linear))
    head_weights = model.lm_head.weight.numel()
    prompt = torch.randint(4, config.vocab_size, (1, 32))
    long_prompt = torch.randint(4, config.vocab_size, (1, args.prompt_tokens))
    # Random weights, random tokens: only the speed of static INT8 is measured on this model.
    calibration = quantization.Calibration([torch.randint(4, config.vocab_size, (128,))
                                            for _ in range(16)])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        models = build_all(args.variants, model, tmp, calibration)
        times = {(v, beams): [] for v in models for beams in (1, 4)}
        first = {v: [] for v in models}
        for v in models:  # warm-up
            for beams in (1, 4):
                generate_seconds(models[v], prompt, 8, beams, config.pad_token_id)
        for r in range(args.rounds):
            for v in models:
                for beams in (1, 4):
                    s = generate_seconds(models[v], prompt, args.tokens, beams, config.pad_token_id)
                    times[(v, beams)].append(s)
                    print(f"  round {r + 1} {v} {'greedy' if beams == 1 else 'beam4'}: {s:.2f} s",
                          flush=True)
                first[v].append(generate_seconds(models[v], long_prompt, 1, 1,
                                                 config.pad_token_id))
    for v in models:
        _, layer_bytes, head_bytes = VARIANTS[v]
        bytes_per_token = layer_weights * layer_bytes + head_weights * head_bytes
        greedy = statistics.median(times[(v, 1)])
        beam = statistics.median(times[(v, 4)])
        results[v] = {
            "greedy_seconds": greedy, "beam4_seconds": beam,
            "greedy_speedup": statistics.median(times[("fp32 eager", 1)]) / greedy,
            "beam4_speedup": statistics.median(times[("fp32 eager", 4)]) / beam,
            "tokens_per_second_b1": args.tokens / greedy,
            "roofline_tokens_per_second": bandwidth / bytes_per_token,
            "ttft_seconds": statistics.median(first[v]),
            "seconds_min": min(times[(v, 1)]), "seconds_max": max(times[(v, 1)]),
        }
        results[v]["fraction_of_roofline"] = (results[v]["tokens_per_second_b1"]
                                              / results[v]["roofline_tokens_per_second"])
    return results


def quality(args) -> dict:
    run_dir = Path(args.demo_run_dir)
    if not (run_dir / "ppo" / "model").exists():
        from llmctl.demo.pipeline import run_demo

        run_demo(run_dir)
    recipe = load_recipe(run_dir / "recipe.toml")
    source_dir = str(run_dir / "ppo" / "model")
    tokenizer = load_tokenizer(source_dir)
    fp_model = load_causal_lm(source_dir).eval()
    blocks = token_blocks(recipe.data["sentiment"], "data.sentiment", "eval", tokenizer, 128, 32)
    calibration = quantization.Calibration([b["input_ids"] for b in token_blocks(
        recipe.data["sentiment"], "data.sentiment", "train", tokenizer, 128, 32)])
    task_path = str(run_dir / "assets" / "lm_tasks")
    results = {}
    for variant, model in build_all(args.variants, fp_model, source_dir, calibration).items():
        acc = lm_eval_tasks(model, tokenizer, ["demo_sentiment"], task_path,
                            batch_size=8)["demo_sentiment"]["acc"]
        results[variant] = {"perplexity": perplexity(model, blocks), "acc": acc}
    base = results["fp32 eager"]
    for r in results.values():
        r["perplexity_loss"] = r["perplexity"] / base["perplexity"] - 1
        r["acc_loss"] = (base["acc"] - r["acc"]) / base["acc"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="opt-125m")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="prompt length for time to first token")
    parser.add_argument("--no-quality", action="store_true",
                        help="speed only (skip the demo model's quality loss)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--demo-run-dir", default="runs/demo")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="default: all at opt-125m, DEFAULT_1_3B at opt-1.3b")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.variants is None:
        args.variants = DEFAULT_1_3B[:] if args.shape == "opt-1.3b" else list(VARIANTS)
    if "fp32 eager" not in args.variants:
        args.variants.insert(0, "fp32 eager")
    check_memory(args.variants, args.shape, available_memory())

    bandwidth = read_bandwidth()
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    print(f"{args.shape} shape, {args.tokens} forced tokens, batch 1, median of {args.rounds}:")
    fast = speed(args, bandwidth)
    good = {}
    if not args.no_quality:
        print("demo model quality (perplexity on held-out sentiment rows, demo_sentiment acc):")
        good = quality(args)

    print()
    print(f"| variant | greedy s (min-max) | speed-up | 4-beam s | speed-up | tok/s b1 | roofline "
          f"tok/s | of roofline | TTFT {args.prompt_tokens} tok | demo perplexity loss "
          "| demo acc loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in args.variants:
        s, q = fast[v], good.get(v)
        loss = (f"{q['perplexity_loss']:+.2%} | {q['acc_loss']:+.2%}" if q else "- | -")
        print(f"| {v} | {s['greedy_seconds']:.2f} ({s['seconds_min']:.2f}-{s['seconds_max']:.2f}) "
              f"| {s['greedy_speedup']:.2f}x | {s['beam4_seconds']:.2f} | {s['beam4_speedup']:.2f}x "
              f"| {s['tokens_per_second_b1']:.1f} | {s['roofline_tokens_per_second']:.0f} | "
              f"{s['fraction_of_roofline']:.0%} | {s['ttft_seconds']:.2f} s | {loss} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "bandwidth": bandwidth,
                                               "speed": fast,
                                               "quality": good}, indent=2))


if __name__ == "__main__":
    main()
