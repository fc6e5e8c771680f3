"""`llmctl bench` against running `lm_eval` directly, on the same model and task.

Each side runs as a user runs it, a fresh process from the shell: `llmctl bench RECIPE` (lm-eval
tasks only: no perplexity, no timing) and `lm_eval --model hf --model_args pretrained=DIR
--tasks demo_sentiment --include_path TASKS`. The rounds alternate the two, because this
machine's speed drifts; the script prints median wall times, their ratio (target <= 1.05) and
checks that both report the same accuracy. Models: the trained demo model (``runs/demo``, made
by ``llmctl demo`` if missing) and an OPT-125m-shaped model built from its config. Usage:

    python scripts/bench_eval.py [--rounds 3] [--demo-run-dir runs/demo]
"""

from __future__ import annotations

from llmctl.env import quiet_libraries

quiet_libraries()  # before transformers is imported

import argparse  # noqa: E402
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import OPTConfig, OPTForCausalLM

from llmctl.models import load_tokenizer

BIN = Path(sys.executable).parent
TASK = "demo_sentiment"


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def compare(model_dir: str, task_path: str, work: Path, rounds: int, batch_size: int) -> dict:
    recipe = work / f"bench-{Path(model_dir).name}.toml"
    recipe.write_text(f"""[run]
name = "bench-eval"
dir = "{work / 'run'}"
[bench]
models = ["{model_dir}"]
tasks = ["{TASK}"]
task_path = "{task_path}"
batch_size = {batch_size}
latency = {{ runs = 0 }}
""")
    llmctl = [str(BIN / "llmctl"), "bench", str(recipe)]
    out_dir = work / "lm_eval_out"
    lm_eval = [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model_dir}",
               "--tasks", TASK, "--include_path", task_path, "--batch_size", str(batch_size),
               "--output_path", str(out_dir)]
    times = {"llmctl bench": [], "lm_eval": []}
    for r in range(rounds):
        for name, cmd in (("llmctl bench", llmctl), ("lm_eval", lm_eval)):
            seconds, _ = timed(cmd)
            times[name].append(seconds)
            print(f"  round {r + 1} {name}: {seconds:.1f} s", flush=True)
    ours = json.loads((work / "run" / "bench" / "manifest.json").read_text())["metrics"]
    theirs = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"][TASK]
    llmctl_s, lm_eval_s = (statistics.median(times[k]) for k in ("llmctl bench", "lm_eval"))
    return {"llmctl_seconds": llmctl_s, "lm_eval_seconds": lm_eval_s,
            "ratio": llmctl_s / lm_eval_s,
            "llmctl_acc": ours[f"{TASK}.acc"], "lm_eval_acc": theirs["acc,none"],
            "same_results": ours[f"{TASK}.acc"] == theirs["acc,none"]
            and ours[f"{TASK}.acc_norm"] == theirs["acc_norm,none"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--demo-run-dir", default="runs/demo")
    args = parser.parse_args()
    run_dir = Path(args.demo_run_dir).resolve()
    if not (run_dir / "ppo" / "model").exists():
        from llmctl.demo.pipeline import run_demo

        run_demo(run_dir)
    task_path = str(run_dir / "assets" / "lm_tasks")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        opt125 = tmp / "opt-125m-shape"
        # The real OPT-125m's shape; the demo tokenizer's ids all fall inside its vocabulary.
        OPTForCausalLM(OPTConfig()).save_pretrained(opt125)
        load_tokenizer(str(run_dir / "ppo" / "model")).save_pretrained(opt125)
        for name, model_dir in (("demo model", str(run_dir / "ppo" / "model")),
                                ("OPT-125m shape", str(opt125))):
            print(f"{name}:", flush=True)
            work = tmp / name.replace(" ", "-")
            work.mkdir()
            results[name] = compare(model_dir, task_path, work, args.rounds, args.batch_size)
    print()
    print("| model | llmctl bench (s) | lm_eval (s) | ratio | same results |")
    print("|---|---:|---:|---:|---|")
    for name, r in results.items():
        print(f"| {name} | {r['llmctl_seconds']:.1f} | {r['lm_eval_seconds']:.1f} | "
              f"{r['ratio']:.3f} | {'yes' if r['same_results'] else 'NO'} "
              f"(acc {r['llmctl_acc']:.4f} vs {r['lm_eval_acc']:.4f}) |")


if __name__ == "__main__":
    main()
