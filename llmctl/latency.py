"""Generation speed: time to first token, tokens/s and peak memory at forced lengths.

Forced length means ``min_new_tokens == max_new_tokens``, as the course times its 512-token
runs: every model generates the same number of tokens, so their times compare. Each figure is
the median of several runs after one warm-up run. Shared by ``llmctl bench`` and
``scripts/bench_generate.py``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from llmctl.evaluation import model_device

# Prompts are real English cut to an exact token count; any text would do, as long as every
# model sees the same ids.
PROMPT_TEXT = ("The quarterly report shows that revenue grew faster than expected, while costs "
               "stayed flat and the company kept its outlook for the rest of the year. ")


def prompt_ids(tokenizer, prompt_tokens: int, batch_size: int) -> torch.Tensor:
    ids = tokenizer(PROMPT_TEXT * (1 + prompt_tokens // 8), add_special_tokens=False)["input_ids"]
    row = torch.tensor(ids[:prompt_tokens])
    return row.unsqueeze(0).repeat(batch_size, 1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory() -> Iterator[dict[str, int]]:
    """Peak memory while the block runs: CUDA allocator peak, or process RSS sampled every 5 ms."""
    result = {"peak": 0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield result
        result["peak"] = torch.cuda.max_memory_allocated()
        return
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], _rss_bytes())
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], _rss_bytes())


@torch.inference_mode()
def generate_seconds(model, input_ids: torch.Tensor, new_tokens: int, num_beams: int,
                      pad_token_id: int) -> float:
    from transformers import GenerationConfig

    from llmctl.quantization import native_generate

    input_ids = input_ids.to(model_device(model))
    config = GenerationConfig(min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                              num_beams=num_beams, do_sample=False, pad_token_id=pad_token_id)
    start = time.perf_counter()
    if native_generate(model, input_ids, config) is None:  # a backend's runtime, as generate
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       generation_config=config)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_generation(model, input_ids: torch.Tensor, new_tokens: int, num_beams: int = 1,
                    runs: int = 3, pad_token_id: int = 0) -> dict[str, float]:
    """Median seconds for ``new_tokens`` forced tokens and their spread over the runs (min, max:
    a noisy machine shows as a wide range, not as a speed-up), time to first token, tokens/s,
    peak memory."""
    generate_seconds(model, input_ids, min(new_tokens, 4), num_beams, pad_token_id)  # warm-up
    with peak_memory() as memory:
        totals = [generate_seconds(model, input_ids, new_tokens, num_beams, pad_token_id)
                  for _ in range(runs)]
    first = [generate_seconds(model, input_ids, 1, num_beams, pad_token_id) for _ in range(runs)]
    seconds = statistics.median(totals)
    return {"seconds": seconds, "seconds_min": min(totals), "seconds_max": max(totals),
            "ttft_seconds": statistics.median(first),
            "tokens_per_second": input_ids.shape[0] * new_tokens / seconds,
            "peak_memory_bytes": float(memory["peak"])}


def latency_rows(model, tokenizer, prompt_tokens: int, new_tokens: int, batch_sizes: list[int],
                 num_beams: list[int], runs: int) -> list[dict[str, float]]:
    """One timing row per (beams, batch size)."""
    rows = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for beams in num_beams:
        if beams > 1 and not getattr(model, "supports_beam_search", True):
            print(f"    (no {mode_name(beams)} timing: this runtime has no beam search)")
            continue
        for batch in batch_sizes:
            ids = prompt_ids(tokenizer, prompt_tokens, batch)
            timing = time_generation(model, ids, new_tokens, beams, runs, pad)
            rows.append({"mode": mode_name(beams), "num_beams": beams, "batch_size": batch,
                         "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, **timing})
    return rows


def mode_name(num_beams: int) -> str:
    return "greedy" if num_beams == 1 else f"beam{num_beams}"
