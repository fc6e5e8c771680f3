"""Scoring models: label accuracy, reward scores, perplexity, lm-evaluation-harness tasks.

Label accuracy: scoring a causal LM on a labelled split by comparing label log-likelihoods.

For each row the model sees the template's prompt and every candidate label (the distinct values
of the response field in the split); the prediction is the label with the highest total
log-likelihood, as lm-evaluation-harness scores multiple-choice tasks. Used for the before/after
evidence of `llmctl sft`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import math
from statistics import stdev
from pathlib import Path
from typing import Any

import torch

from llmctl.data import Template
from llmctl.env import libraries_quieted
from llmctl.errors import UserError

MAX_LABELS = 20  # above this the response field is free text, not a label


def autocast_for(model):
    """Mixed bf16/fp16 models (the course's bf16 weights with fp32 norms) need autocast to run a
    forward pass outside the Trainer; fp32 models run as they are."""
    low = [p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    if not low:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=low[0])


def candidate_labels(rows: list[dict[str, Any]], template: Template) -> list[str] | None:
    labels = sorted({template.response(r) for r in rows})
    return labels if 1 < len(labels) <= MAX_LABELS else None


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """Sum of log p(continuation tokens | context) for each continuation.

    The tokens every sequence starts with run once; each continuation's own tokens then read
    their KV cache. For the real run's three labels after a 90-token chat prompt this is one
    prompt pass instead of three (label scoring 3x faster)."""
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    seqs, starts = [], []
    for cont in continuations:
        full = tokenizer(context + cont, add_special_tokens=False)["input_ids"]
        # BPE merges across the boundary rarely; a continuation starts where it leaves ctx_ids.
        seqs.append(full)
        starts.append(max(_common_prefix(ctx_ids, full), 1))
    # Shared: a prefix of every sequence that leaves each at least one token to predict.
    shared = min([_common_prefix(ctx_ids, s) for s in seqs] + [len(s) - 1 for s in seqs])
    device = model_device(model)

    def forward(ids: list[int], past=None, last_only: bool = False):
        out = model(input_ids=torch.tensor([ids], device=device), past_key_values=past,
                    use_cache=True)
        logits = out.logits[0, -1:] if last_only else out.logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu(), out.past_key_values

    if shared >= 1:
        prefix_logprobs, past = forward(seqs[0][:shared], last_only=True)
    scores = []
    for seq, start in zip(seqs, starts):
        if shared >= 1:  # rows predicting tokens shared.., the first from the prefix's last one
            rows, first = prefix_logprobs[-1:], shared
            if len(seq) - shared > 1:
                # A copy: the next continuation reads the prefix's cache unextended (a copy
                # works for every cache type; crop() refuses sliding-window layers).
                tail, _ = forward(seq[shared:-1], copy.deepcopy(past))
                rows = torch.cat([rows, tail])
        else:  # nothing shared (an empty context): the sequence alone
            rows, first = forward(seq[:-1])[0], 1
        targets = torch.tensor(seq[start:])
        scores.append(float(rows[torch.arange(start - first, len(seq) - first), targets].sum()))
    return scores


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def label_hits(model, tokenizer, rows: list[dict[str, Any]], template: Template,
               labels: list[str]) -> list[float]:
    """1.0 for each row whose true label gets the highest log-likelihood after the prompt, else
    0.0 (kept per row, so that a before/after gain gets its paired standard error)."""
    was_training = model.training
    model.eval()
    with autocast_for(model):
        hits = [float(_predict(model, tokenizer, row, template, labels) == template.response(row))
                for row in rows]
    if was_training:
        model.train()
    return hits


def task_accuracy_metrics(hits_before: list[float], hits_after: list[float], n_labels: int
                          ) -> dict[str, float]:
    """The before/after label-task evidence of a training stage, printed and as metrics."""
    from llmctl.progress import console

    before, after = sum(hits_before) / len(hits_before), sum(hits_after) / len(hits_after)
    sem = paired_sem(hits_before, hits_after)
    console.print(f"  label accuracy on {len(hits_after)} held-out rows: {before:.3f} before -> "
                  f"{after:.3f} after (gain {after - before:+.3f} ± {sem:.3f}; "
                  f"chance {1 / n_labels:.3f})")
    return {"eval_task_accuracy_before": before, "eval_task_accuracy_after": after,
            "eval_task_accuracy_gain_sem": sem, "eval_task_chance": 1 / n_labels}


def paired_sem(before: list[float], after: list[float]) -> float:
    """Standard error of mean(after) - mean(before) over paired measurements (the same row or
    draw before and after): the yardstick for "did training move this"."""
    if len(before) < 2:
        return float("nan")
    return stdev(a - b for a, b in zip(after, before)) / math.sqrt(len(before))


def _predict(model, tokenizer, row: dict[str, Any], template: Template, labels: list[str]) -> str:
    """The label with the highest log-likelihood after the row's prompt."""
    # Template.split moves the space before the label into the label, as tokenized in training.
    context, _ = template.split(row)
    gap = template.prompt(row)[len(context):]
    scores = continuation_logprobs(model, tokenizer, context, [gap + lab for lab in labels])
    return labels[max(range(len(labels)), key=scores.__getitem__)]


@torch.inference_mode()
def reward_scores(model, tokenizer, texts: list[str], max_length: int = 512,
                  batch_size: int = 16) -> list[float]:
    """The scalar a one-label sequence classifier gives each text, with its own tokenizer."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    drop_token_types = not accepts_argument(model, "token_type_ids")
    scores: list[float] = []
    with autocast_for(model):
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            if drop_token_types:
                batch.pop("token_type_ids", None)
            scores += model(**batch).logits.float().squeeze(-1).tolist()
    if was_training:
        model.train()
    return scores


def accepts_argument(model, name: str) -> bool:
    """Whether the model's forward() takes ``name`` (encoders and decoders differ)."""
    return name in inspect.signature(model.forward).parameters


def preference_accuracy(model, tokenizer, rows: list[dict[str, Any]], max_length: int
                        ) -> tuple[float, float]:
    """(fraction of pairs whose chosen text outscores the rejected one, mean margin)."""
    prompt = [str(r.get("prompt", "")) for r in rows]
    chosen = reward_scores(model, tokenizer, [p + str(r["chosen"]) for p, r in zip(prompt, rows)],
                           max_length)
    rejected = reward_scores(model, tokenizer,
                             [p + str(r["rejected"]) for p, r in zip(prompt, rows)], max_length)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def model_device(model) -> torch.device:
    """Where a model's inputs go: HF and OpenVINO models say so; plain modules by a parameter."""
    found = getattr(model, "device", None)
    return torch.device(found) if found is not None else next(model.parameters()).device


@torch.inference_mode()
def perplexity(model, blocks: list[dict[str, torch.Tensor]], batch_size: int = 4) -> float:
    """exp(mean negative log-likelihood per predicted token) over causal-LM blocks.

    Every label that is not -100 counts once, whatever the batching, so the number is the
    same for any batch size (the course's worked example: p = 0.4, 0.27, 0.55, 0.79 gives
    2.1486).
    """
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    with autocast_for(model) if hasattr(model, "parameters") else contextlib.nullcontext():
        for i in range(0, len(blocks), batch_size):
            batch = {k: torch.stack([b[k] for b in blocks[i:i + batch_size]])
                     for k in ("input_ids", "attention_mask", "labels")}
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
            targets = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((targets != -100).sum())
    return math.exp(total_nll / max(total_tokens, 1))


@functools.lru_cache(maxsize=4)
def task_manager_for(task_path: str | None, include_defaults: bool = True):
    """lm-eval's task index, once per process: ``task_path``'s tasks, and the harness's own
    unless ``include_defaults`` is off (indexing those reads some 14,000 YAML files, 15-30 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_path, include_defaults=include_defaults)


def check_tasks(tasks: list[str], task_path: str | None, key: str = "bench.tasks"):
    """The task manager, once every task name is known to it (exit 2 otherwise): ``task_path``'s
    own index when it holds every task, else the harness's too."""
    from llmctl.paths import exists

    table = key.rsplit(".", 1)[0]
    if task_path and not exists(task_path):
        raise UserError(f"{table}.task_path: {task_path} does not exist (a directory of lm-eval "
                        f"YAML tasks)")
    if task_path and not Path(task_path).is_dir():
        raise UserError(f"{table}.task_path: {task_path} is not a directory (of lm-eval YAML "
                        f"tasks)")
    task_manager = task_manager_for(task_path, include_defaults=False) if task_path else None
    if task_manager is None or not all(t in task_manager.all_tasks for t in tasks):
        task_manager = task_manager_for(task_path)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        where = f" or in {task_path}" if task_path else " (set task_path for local YAML tasks)"
        raise UserError(f"{key}: lm-eval task {unknown[0]!r} is not in the harness registry{where}")
    return task_manager


def lm_eval_tasks(model, tokenizer, tasks: list[str], task_path: str | None = None,
                  num_fewshot: int | None = None, limit: int | None = None,
                  batch_size: int = 8, apply_chat_template: bool = False
                  ) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness results, task -> metric -> value (stderr as ``<metric>_stderr``).

    The harness gets the model already loaded, through llmctl's one loader (safetensors only,
    remote code off, adapters on their fingerprinted base), never a ``model_args`` string:
    lm-eval splits that on commas, so a path such as ``runs/lr=2e-3,bs=16`` would be cut up,
    and a crafted one could switch ``trust_remote_code`` on. ``apply_chat_template``: each
    prompt becomes a user turn in the model's chat template (lm-eval's own option; choices then
    follow the generation prompt with no delimiter), as a chat model was trained.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_manager = check_tasks(tasks, task_path)
    quiet = libraries_quieted()
    if quiet:  # its note on every already-loaded model, which is how llmctl works
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if quiet:  # its bars are switched on per call (TQDM_DISABLE cannot reach them)
        for request in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(wrapped, request, functools.partial(getattr(wrapped, request),
                                                        disable_tqdm=True))
    with _without_lm_eval_provenance():
        results = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, num_fewshot=num_fewshot,
                                          limit=limit, batch_size=batch_size,
                                          apply_chat_template=apply_chat_template,
                                          task_manager=task_manager, log_samples=False,
                                          verbosity="ERROR")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {}
        for key, value in metrics.items():
            name, comma, _filter = key.partition(",")  # "acc,none": metric, filter
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[task][name] = float(value)
    return out


@contextlib.contextmanager
def _without_lm_eval_provenance():
    """lm-eval adds a git hash and an environment report to every result, which llmctl drops:
    its `git describe` prints "fatal: not a git repository" into the user's terminal outside a
    repository, and torch's environment report starts pip and nvidia-smi on each call. The
    manifest records llmctl's own provenance."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda storage: None)
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


def write_choice_task(folder, name: str, rows: list[dict[str, Any]], doc_to_text: str,
                      label_field: str, labels: list[str]) -> Path:
    """A local lm-evaluation-harness task (``task_path = folder``): multiple choice over
    ``labels``, the rows as its test split (JSON lines beside the YAML), scored by
    log-likelihood (acc, acc_norm). ``doc_to_text`` is a Jinja template over the rows' fields."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_choice": list(labels),
        "doc_to_target": "{{" + repr(list(labels)) + ".index(" + label_field + ")}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False, width=1000))
    return path

