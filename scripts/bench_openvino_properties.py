"""OpenVINO runtime properties for batch-1 decoding of a weight-compressed model, measured.

Builds the course's OPT-1.3B shape (``--shape``) from its config (random weights, no download), compresses
its weights as `llmctl quantize` does (``--bits 4``: INT4 g128 symmetric, or 8), saves it as the
quantize stage leaves it, and decodes ``--tokens`` forced new tokens greedily through
openvino-genai's ``LLMPipeline`` opened with each property set below on top of llmctl's own.
Rounds interleave the sets (this machine drifts by +-20% within a minute); speed-ups are
against llmctl's properties in the same run. Usage:

    python scripts/bench_openvino_properties.py [--shape opt-1.3b|opt-125m] [--bits 4]
        [--tokens 128] [--rounds 2] [--levers NAME ...]

``--model DIR`` times an OpenVINO model `llmctl quantize` (or ``bench_peer.py``'s work folder)
saved instead, such as the real run's INT4 SmolLM2, where llama.cpp is the comparison.
"""

from __future__ import annotations

from llmctl.env import quiet_libraries

quiet_libraries()  # before transformers is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from bench_generate import SHAPES, VARIANTS, reopened  # noqa: E402  (scripts/ is on sys.path)
from transformers import OPTConfig, OPTForCausalLM  # noqa: E402

from llmctl import quantization  # noqa: E402
from llmctl.latency import generate_seconds  # noqa: E402
from llmctl.paths import read_json  # noqa: E402
from llmctl.quantization.openvino import CPU_PROPERTIES  # noqa: E402

# name -> properties for LLMPipeline, each on top of what llmctl opens OpenVINO models with
# (CPU_PROPERTIES: f32 arithmetic), so that a speed-up is a lever llmctl does not pull yet.
# CPU plugin names, plus openvino-genai's ATTENTION_BACKEND: LLMPipeline runs the paged-
# attention (continuous batching) engine by default; "SDPA" is the stateful model alone.
LEVERS = {
    "llmctl (f32)": {},
    "bf16 precision": {"INFERENCE_PRECISION_HINT": "bf16"},  # OpenVINO's default where AMX is
    "sdpa backend": {"ATTENTION_BACKEND": "SDPA"},
    "latency hint": {"PERFORMANCE_HINT": "LATENCY"},
    "kv cache u8": {"KV_CACHE_PRECISION": "u8"},
    "dyn quant off": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
    "dyn quant group 32": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"},
    "dyn quant group 128": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "128"},
    "2 threads": {"INFERENCE_NUM_THREADS": 2},
    "sdpa + kv u8": {"ATTENTION_BACKEND": "SDPA", "KV_CACHE_PRECISION": "u8"},
}
BASELINE = "llmctl (f32)"


def same_as_baseline(ir: Path, levers: list[str]) -> dict[str, str]:
    """The levers that set only what OpenVINO's CPU plugin already chose for the model under
    llmctl's properties (name -> why), read back from the compiled model: timing one of them
    times the baseline twice. On the 2-core AMX Xeon, f32 arithmetic already came with a u8 KV
    cache, activations quantized in groups of 32 and the latency hint, so those three levers had
    measured nothing but the machine's drift (a "1.32x" among them). ATTENTION_BACKEND is
    openvino-genai's, not the plugin's: a lever that sets it is always timed."""
    import openvino

    compiled = openvino.Core().compile_model(ir, "CPU", dict(CPU_PROPERTIES))
    found = {}
    for name in levers:
        props = LEVERS[name]
        if props and "ATTENTION_BACKEND" not in props and all(
                _text(compiled.get_property(k)) == str(v).lower() for k, v in props.items()):
            found[name] = ", ".join(f"{k}={_text(compiled.get_property(k))}" for k in props)
    return found


def _text(value) -> str:
    """A compiled model's property as a recipe would write it: element types by their short
    name (``u8``, not ``<Type: 'uint8_t'>``), enums and numbers as text."""
    name = getattr(value, "get_type_name", None)
    return (name() if name else str(value).rsplit(".", 1)[-1]).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), help="default: opt-1.3b")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="default: 4")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levers", nargs="+", choices=list(LEVERS), default=list(LEVERS),
                        help=f"which property sets to time ({BASELINE!r} always is)")
    parser.add_argument("--model", help="an OpenVINO quantize output to time instead of --shape")
    args = parser.parse_args()
    if args.model and (args.shape or args.bits):
        parser.error("--model times a saved model as it is: --shape and --bits build one")
    args.shape, args.bits = args.shape or "opt-1.3b", args.bits or 4
    args.levers = [BASELINE, *(name for name in args.levers if name != BASELINE)]
    import openvino_genai

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.model:
            model = quantization.load(args.model)
            settings = read_json(Path(args.model) / quantization.MARKER)
            config, label = model.config, f"{args.model} ({quantization.describe(settings)})"
        else:
            config = OPTConfig(**SHAPES[args.shape])
            spec = VARIANTS["openvino int4 g128" if args.bits == 4 else "openvino int8"][0]
            fp_model = OPTForCausalLM(config).eval()
            fp_model.save_pretrained(tmp)
            model = reopened(quantization.quantize(fp_model, tmp, spec,
                                                   quantization.Calibration([])),
                             spec)  # saved and loaded back as `llmctl quantize` leaves it
            del fp_model
            label = f"{args.shape} INT{args.bits}"
            print(f"built INT{args.bits} in {time.perf_counter() - t0:.0f} s", flush=True)
        saved = model.llmctl_dir
        for name, what in same_as_baseline(saved / "openvino_model.xml", args.levers).items():
            print(f"  skipped {name!r}: llmctl's compiled model has it already ({what})")
            args.levers.remove(name)
        prompt = torch.randint(4, config.vocab_size, (1, 32))
        pipelines = {name: openvino_genai.LLMPipeline(str(saved), "CPU",
                                                      **{**CPU_PROPERTIES, **props})
                     for name, props in LEVERS.items() if name in args.levers}

        def decode(name: str, tokens: int) -> float:
            model._llmctl_genai = pipelines[name]  # what generate_seconds decodes with
            return generate_seconds(model, prompt, tokens, 1, config.pad_token_id)

        for name in pipelines:
            decode(name, 8)  # warm-up
        times = {name: [] for name in pipelines}
        for r in range(args.rounds):
            for name in pipelines:
                seconds = decode(name, args.tokens)
                times[name].append(seconds)
                print(f"  round {r + 1} {name}: {seconds:.2f} s", flush=True)
    base = statistics.median(times[BASELINE])
    print(f"\n{label}, {args.tokens} forced tokens, greedy, batch 1, median of {args.rounds}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:28s} {median:6.2f} s  {args.tokens / median:5.1f} tok/s  "
              f"{base / median:4.2f}x llmctl  (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
