"""Where a decoding step's time goes in an OpenVINO model llmctl saved, operator by operator.

Opens the model's IR (``openvino_model.xml`` in a `llmctl quantize` output or ``bench_peer.py``'s
work folder) with llmctl's CPU properties plus OpenVINO's per-node counters, fills the KV cache
to ``--context`` positions (a 32-token prompt, then greedy steps), times ``--steps`` more
single-token steps, and prints the step's wall time, the operators' own time summed by type and
kernel, and the rate at which the weight-reading layers (``FullyConnected``) read the weights
file beside the rate this machine reads memory at. Counters add a little time to every node: read the shares, not the totals, as what the
pipeline pays. Usage:

    python scripts/profile_openvino.py --model DIR [--context 544] [--steps 40]
        [--property KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a folder holding openvino_model.xml")
    parser.add_argument("--context", type=int, default=544,
                        help="KV cache positions before the timed steps (544: a 32-token "
                             "prompt and 512 new tokens, bench_peer's longest run)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--property", action="append", default=[], metavar="KEY=VALUE",
                        help="an OpenVINO CPU property on top of llmctl's (repeatable)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    ir = Path(args.model) / "openvino_model.xml"
    if not ir.is_file():
        parser.error(f"--model: {ir} does not exist")
    try:
        extra = dict(item.split("=", 1) for item in args.property)
    except ValueError:
        parser.error("--property takes KEY=VALUE")
    import openvino
    from bench_generate import read_bandwidth  # scripts/ is on sys.path

    from llmctl.quantization.openvino import CPU_PROPERTIES

    core = openvino.Core()
    model = core.read_model(ir)
    compiled = core.compile_model(model, "CPU", {**CPU_PROPERTIES, **extra, "PERF_COUNT": "YES"})
    print(f"{args.model}: " + ", ".join(
        f"{key} {compiled.get_property(key)}" for key in
        ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE",
         "INFERENCE_NUM_THREADS")))
    request = compiled.create_infer_request()
    inputs = {port.get_any_name() for port in model.inputs}

    def step(ids: np.ndarray, past: int) -> int:
        feed = {"input_ids": ids, "attention_mask": np.ones((1, past + ids.shape[1]), np.int64),
                "position_ids": np.arange(past, past + ids.shape[1], dtype=np.int64)[None],
                "beam_idx": np.zeros(1, np.int32)}
        request.infer({name: value for name, value in feed.items() if name in inputs})
        return int(request.get_output_tensor(0).data[0, -1].argmax())

    token, past = step(np.arange(100, 132, dtype=np.int64)[None], 0), 32
    while past < args.context:
        token, past = step(np.array([[token]]), past), past + 1
    own = collections.Counter()
    nodes = collections.Counter()
    wall = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        token, past = step(np.array([[token]]), past), past + 1
        wall += time.perf_counter() - start
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                key = (info.node_type, info.exec_type)
                own[key] += info.real_time.total_seconds()
                nodes[key] += 1
    total = sum(own.values())
    print(f"context {args.context}-{past}: {1000 * wall / args.steps:.2f} ms a step (wall), "
          f"operators {1000 * total / args.steps:.2f} ms")
    for (node, kernel), seconds in own.most_common(10):
        print(f"  {node:38s} {kernel:24s} {1000 * seconds / args.steps:6.2f} ms "
              f"{100 * seconds / total:5.1f}%  {nodes[(node, kernel)] // args.steps} nodes")
    weights = ir.with_suffix(".bin").stat().st_size
    fc = sum(s for (node, _), s in own.items() if node.startswith("FullyConnected"))
    if fc:
        print(f"FullyConnected: {1000 * fc / args.steps:.2f} ms a step for a {weights / 2**20:.0f} "
              f"MiB weights file: {weights * args.steps / fc / 1e9:.1f} GB/s, where this "
              f"machine reads {read_bandwidth() / 1e9:.1f} GB/s (a sum over 1 GiB in torch)")


if __name__ == "__main__":
    main()
