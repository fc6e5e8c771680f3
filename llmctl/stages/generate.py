"""`llmctl generate`: decode from any stage's model with the recipe's template and decoding knobs.

Loads a model directory or hub id (a LoRA adapter directory is loaded on its base), turns each
prompt into the template's prompt text, generates, cuts at stop sequences and writes
``generations.jsonl``. Greedy, sampling (top-k, top-p, temperature), beam search (length
penalty), repetition penalty, min/max new tokens and several return sequences are all
``model.generate`` arguments taken from the ``[generate]`` table. An OpenVINO model from
`llmctl quantize` (backend "openvino") decodes in openvino-genai's C++ loop with the same
settings (llmctl.quantization.openvino.genai_generate says which it takes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from llmctl.data import ChatTemplate, Template
from llmctl.errors import UserError
from llmctl.models import device, load_tokenizer, max_positions
from llmctl.quantization import load_model, native_generate
from llmctl.progress import stage_header
from llmctl.paths import read_text
from llmctl.schema import GenerateConfig
from llmctl.stages import StageContext


def run(ctx: StageContext) -> dict:
    recipe, cfg, inputs = ctx.recipe, ctx.cfg, ctx.inputs
    loaded = load_for_decoding(recipe, cfg, inputs["model"])
    stage = ctx.start()  # once the model has loaded and every prompt fits
    results, metrics = decode_prompts(loaded, cfg)
    with open(stage.path("generations.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    stage.finish(metrics, {"generations": "generations.jsonl"})
    return {"results": results, "metrics": metrics}


def run_adhoc(recipe, model: str) -> dict:
    """`llmctl generate --model ...` without a recipe: the same decoding, nothing written to
    a run directory (the pipeline's own generate/ output stays as it was)."""
    from llmctl.models import check_loadable

    check_loadable(model, recipe.model, "--model")
    results, metrics = decode_prompts(load_for_decoding(recipe, recipe.generate, model),
                                      recipe.generate)
    return {"results": results, "metrics": metrics}


def load_for_decoding(recipe, cfg: GenerateConfig, model_path: str) -> tuple:
    """(model, tokenizer, prompts, model inputs): the prompts read, put through the template
    and checked against the model's positions."""
    prompts = read_prompts(cfg)
    tokenizer = load_tokenizer(model_path, recipe.model, padding_side="left")
    model = load_model(model_path, recipe.model).to(device()).eval()
    stage_header("generate", f"{len(prompts)} prompt(s) with {model_path}")

    template = None
    if cfg.template == "chat":  # each prompt is the user's turn, in the model's chat template
        template = ChatTemplate(tokenizer, cfg.system, "{prompt}", "response")
    elif cfg.template:
        template = Template.get(cfg.template)
    texts = [apply_template(template, p) for p in prompts]
    check_lengths(model, tokenizer, texts, cfg)
    return model, tokenizer, prompts, texts


def decode_prompts(loaded: tuple, cfg: GenerateConfig) -> tuple[list[dict], dict]:
    """Every prompt through the decoder: the results and the metrics."""
    model, tokenizer, prompts, texts = loaded
    t0 = time.perf_counter()
    results, new_tokens = [], 0
    for prompt, text in zip(prompts, texts):
        completions, n = generate(model, tokenizer, text, cfg)
        new_tokens += n
        results.append({"prompt": prompt, "input": text, "completions": completions})
    seconds = time.perf_counter() - t0
    return results, {"num_prompts": len(prompts), "new_tokens": new_tokens,
                     "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0}


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise UserError(f"generate.prompts_file: {path} not found")
        lines = read_text(path).splitlines()
        if path.suffix == ".jsonl":
            prompts += [jsonl_prompt(line, f"{path}:{n}")
                        for n, line in enumerate(lines, 1) if line.strip()]
        else:
            prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise UserError("generate.prompts: no prompts (give --prompt, generate.prompts or "
                        "generate.prompts_file)")
    return prompts


def jsonl_prompt(line: str, where: str) -> str:
    """The prompt of one JSONL line: its "prompt" string, or an object of template fields."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON: {err.msg}") from None
    if not isinstance(row, dict) or "prompt" not in row:
        raise UserError(f"{where}: no \"prompt\" key (each line: {{\"prompt\": \"...\"}})")
    prompt = row["prompt"]
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def check_lengths(model, tokenizer, texts: list[str], cfg: GenerateConfig) -> None:
    """Exit 2 before generating when a prompt, or prompt plus max_new_tokens, does not fit the
    model's positions (past them a model indexes outside its position table)."""
    positions = max_positions(model)
    if positions is None:
        return
    for i, text in enumerate(texts):
        n = len(tokenizer(text, return_token_type_ids=False)["input_ids"])
        if n >= positions:
            raise UserError(f"generate.prompts[{i}]: {n} tokens, longer than the model's "
                            f"{positions} positions")
        if n + cfg.max_new_tokens > positions:
            raise UserError(f"generate.max_new_tokens: {cfg.max_new_tokens} new tokens after "
                            f"prompt {i}'s {n} tokens exceed the model's {positions} positions "
                            f"(at most {positions - n})")


def apply_template(template: Template | ChatTemplate | None, prompt: str) -> str:
    """A prompt fills the template's first field; a JSON object prompt fills several fields.

    The prompt is the text before the template's response field, less trailing spaces: a BPE
    tokenizer joins that space to the answer's first word, so "Answer:" + " Paris" matches how
    the model saw "Answer: Paris" in training, where "Answer: " + "Paris" would not.
    """
    fields = template.prompt_fields if template is not None else []
    if not fields:  # no template, or one that is all response ("text"): plain continuation
        return prompt
    if prompt.lstrip().startswith("{"):
        try:
            row = json.loads(prompt)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            return template.context(row)
    if len(fields) != 1:
        raise UserError(f"generate.template: it has fields {fields}; give each prompt as a "
                        f"JSON object with those keys")
    return template.context({fields[0]: prompt})


@torch.inference_mode()
def generate(model, tokenizer, text: str, cfg: GenerateConfig) -> tuple[list[str], int]:
    """Completions for one prompt, cut at the first stop sequence; and the new-token count."""
    batch = tokenizer(text, return_tensors="pt", return_token_type_ids=False).to(model.device)
    gen_config = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        do_sample=cfg.do_sample,
        num_beams=cfg.num_beams,
        top_k=cfg.top_k if cfg.do_sample else None,
        top_p=cfg.top_p if cfg.do_sample else None,
        temperature=cfg.temperature if cfg.do_sample else None,
        repetition_penalty=cfg.repetition_penalty,
        length_penalty=cfg.length_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        num_return_sequences=cfg.num_return_sequences,
        stop_strings=cfg.stop or None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new = native_generate(model, batch["input_ids"], gen_config)  # e.g. openvino-genai's C++ loop
    if new is None:
        out = model.generate(**batch, generation_config=gen_config, tokenizer=tokenizer)
        new = out[:, batch["input_ids"].shape[1]:]
    completions = [cut_at_stop(t, cfg.stop)
                   for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return completions, sum(generated_length(seq, tokenizer.eos_token_id) for seq in new)


def generated_length(tokens, eos_token_id: int | None) -> int:
    """New tokens up to and including the first eos (what follows is padding)."""
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return tokens.index(eos_token_id) + 1 if eos_token_id in tokens else len(tokens)


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]
