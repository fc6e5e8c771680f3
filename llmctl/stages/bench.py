"""`llmctl bench`: quality and speed of one or more models, side by side.

For each model (a stage's output, a directory or a hub id): lm-evaluation-harness tasks,
perplexity on a held-out Deep Lake split, and generation timing at forced lengths (greedy and
beam search, batch 1 and batched). Writes ``report.json``, ``report.md`` and ``latency.png``
and prints the tables. The manifest's metrics are the first model's figures under plain keys
(``demo_sentiment.acc``, ``perplexity``, ``greedy_b1_tokens_per_second``...) and every model's
under ``<label>/<key>``, with ``<label>/speedup_<mode>_b<batch>`` against the first model.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from rich.table import Table

from llmctl.data import heldout_blocks
from llmctl.evaluation import lm_eval_tasks, perplexity
from llmctl.latency import latency_rows
from llmctl.models import device, load_tokenizer
from llmctl.paths import looks_local
from llmctl.progress import console, stage_header
from llmctl.quantization import is_quantized_dir, load_model, weight_bytes
from llmctl.recipe import Recipe
from llmctl.schema import BenchConfig
from llmctl.stages import StageContext


def run(ctx: StageContext) -> dict:
    recipe, cfg, models = ctx.recipe, ctx.cfg, ctx.inputs
    source = recipe.data_source("bench", cfg.data) if cfg.data else None
    stage_header("bench", f"{', '.join(models)}: {', '.join(cfg.tasks) or 'no lm-eval tasks'}"
                          f"{', perplexity' if source else ''}"
                          f"{', latency' if cfg.latency.runs else ''}")
    stage = ctx.start()

    report = {"device": str(device()), "models": {}}
    for label, path in models.items():
        console.print(f"  [bold]{label}[/] {path}")
        report["models"][label] = bench_model(recipe, cfg, source, path)

    metrics = flat_metrics(report["models"])
    stage.path("report.json").write_text(json.dumps(report, indent=2) + "\n")
    stage.path("report.md").write_text(markdown_report(report))
    outputs = {"report": "report.json", "report_md": "report.md"}
    if cfg.latency.runs and save_latency_chart(report["models"], stage.path("latency.png")):
        outputs["latency_chart"] = "latency.png"
    final = stage.finish(metrics, outputs)
    print_tables(report["models"])
    console.print(f"  report -> {final / 'report.md'}")
    return metrics


def bench_model(recipe: Recipe, cfg: BenchConfig, source, path: str) -> dict:
    entry: dict = {"path": path}
    if looks_local(path):
        entry["size_bytes"] = weight_bytes(path)
    tokenizer = load_tokenizer(path, recipe.model, padding_side="left")
    model = load_model(path, recipe.model).eval()
    if hasattr(model, "to") and not is_quantized_dir(path):
        model = model.to(device())
    if cfg.tasks:
        entry["tasks"] = lm_eval_tasks(model, tokenizer, cfg.tasks, cfg.task_path,
                                       cfg.num_fewshot, cfg.limit, cfg.batch_size,
                                       cfg.apply_chat_template)
        for task, values in entry["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if "stderr" not in k)
            console.print(f"    {task}: {shown}")
    if source is not None:
        blocks = heldout_blocks(source, cfg.data, tokenizer, cfg)
        entry["perplexity"] = perplexity(model, blocks, cfg.eval_batch_size)
        console.print(f"    perplexity {entry['perplexity']:.3f} on {len(blocks)} blocks")
    if cfg.latency.runs:
        lat = cfg.latency
        entry["latency"] = latency_rows(model, tokenizer, lat.prompt_tokens, lat.new_tokens,
                                        lat.batch_sizes, lat.num_beams, lat.runs)
        for row in entry["latency"]:
            console.print(f"    {row['mode']} batch {row['batch_size']}: {row['seconds']:.3f} s "
                          f"({spread(row)}) for {row['new_tokens']} tokens, "
                          f"{row['tokens_per_second']:.1f} tok/s")
    del model
    gc.collect()
    return entry


def spread(row: dict) -> str:
    """A timing's range over its runs (older reports have none)."""
    if "seconds_min" not in row:
        return "n/a"
    return f"{row['seconds_min']:.3f}-{row['seconds_max']:.3f}"


def _model_metrics(entry: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for task, values in entry.get("tasks", {}).items():
        for name, value in values.items():
            out[f"{task}.{name}"] = value
    if "perplexity" in entry:
        out["perplexity"] = entry["perplexity"]
    if "size_bytes" in entry:
        out["size_bytes"] = entry["size_bytes"]
    for row in entry.get("latency", []):
        key = f"{row['mode']}_b{row['batch_size']}"
        out[f"{key}_seconds"] = row["seconds"]
        out[f"{key}_seconds_min"] = row["seconds_min"]
        out[f"{key}_seconds_max"] = row["seconds_max"]
        out[f"{key}_ttft_seconds"] = row["ttft_seconds"]
        out[f"{key}_tokens_per_second"] = row["tokens_per_second"]
        out[f"{key}_peak_memory_bytes"] = row["peak_memory_bytes"]
    return out


def flat_metrics(models: dict[str, dict]) -> dict[str, float]:
    per_model = {label: _model_metrics(entry) for label, entry in models.items()}
    first = next(iter(per_model.values()))
    metrics = dict(first)
    for label, values in per_model.items():
        metrics.update({f"{label}/{k}": v for k, v in values.items()})
        for key, seconds in values.items():
            if key.endswith("_seconds") and not key.endswith("ttft_seconds") and key in first:
                metrics[f"{label}/speedup_{key[:-len('_seconds')]}"] = first[key] / seconds
    return metrics


# -- reports ---------------------------------------------------------------------------------


def _task_rows(models: dict[str, dict]) -> list[tuple[str, str, str, float]]:
    return [(label, task, name, value) for label, entry in models.items()
            for task, values in entry.get("tasks", {}).items()
            for name, value in values.items() if not name.endswith("_stderr")]


def markdown_report(report: dict) -> str:
    models = report["models"]
    first = next(iter(models))
    lines = [f"# llmctl bench ({report['device']})", ""]
    lines += ["| model | path | size (MiB) | perplexity |", "|---|---|---:|---:|"]
    for label, entry in models.items():
        size = f"{entry['size_bytes'] / 2**20:.1f}" if "size_bytes" in entry else ""
        ppl = f"{entry['perplexity']:.3f}" if "perplexity" in entry else ""
        lines.append(f"| {label} | `{entry['path']}` | {size} | {ppl} |")
    rows = _task_rows(models)
    if rows:
        lines += ["", "| model | task | metric | value | ± stderr |", "|---|---|---|---:|---:|"]
        for label, task, name, value in rows:
            err = models[label]["tasks"][task].get(f"{name}_stderr")
            lines.append(f"| {label} | {task} | {name} | {value:.4f} | "
                         f"{'' if err is None else f'{err:.4f}'} |")
    if any("latency" in e for e in models.values()):
        lines += ["", f"| model | decoding | batch | new tokens | seconds (min-max) | first token (s) | "
                      f"tokens/s | peak memory (MiB) | speed-up vs {first} |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        base = {(r["mode"], r["batch_size"]): r["seconds"] for r in models[first].get("latency", [])}
        for label, entry in models.items():
            for r in entry.get("latency", []):
                ref = base.get((r["mode"], r["batch_size"]))
                speedup = f"{ref / r['seconds']:.2f}x" if ref else ""
                lines.append(f"| {label} | {r['mode']} | {r['batch_size']} | {r['new_tokens']} | "
                             f"{r['seconds']:.3f} ({spread(r)}) | {r['ttft_seconds']:.4f} | "
                             f"{r['tokens_per_second']:.1f} | {r['peak_memory_bytes'] / 2**20:.0f} |"
                             f" {speedup} |")
    return "\n".join(lines) + "\n"


def save_latency_chart(models: dict[str, dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["mode"], r["batch_size"]) for e in models.values()
                      for r in e.get("latency", [])})
    if not configs:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(configs)), 3.5))
    width = 0.8 / len(models)
    for i, (label, entry) in enumerate(models.items()):
        speed = {(r["mode"], r["batch_size"]): r["tokens_per_second"] for r in entry.get("latency", [])}
        ax.bar([c + i * width for c in range(len(configs))],
               [speed.get(c, 0.0) for c in configs], width, label=label)
    ax.set_xticks([c + width * (len(models) - 1) / 2 for c in range(len(configs))])
    ax.set_xticklabels([f"{m}\nbatch {b}" for m, b in configs])
    ax.set_ylabel("tokens/s")
    ax.set_title("generation speed (forced length, median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def print_tables(models: dict[str, dict]) -> None:
    table = Table(title="llmctl bench")
    table.add_column("model")
    table.add_column("quality")
    table.add_column("speed")
    for label, entry in models.items():
        quality = [f"{t}.{n} {v:.4f}" for lab, t, n, v in _task_rows({label: entry})]
        if "perplexity" in entry:
            quality.append(f"perplexity {entry['perplexity']:.3f}")
        speed = [f"{r['mode']} b{r['batch_size']}: {r['tokens_per_second']:.1f} tok/s"
                 for r in entry.get("latency", [])]
        table.add_row(label, "\n".join(quality), "\n".join(speed))
    console.print(table)
