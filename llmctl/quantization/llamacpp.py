"""llama.cpp as llmctl's runtime for a GGUF quantize output (``quantize.backend = "gguf"``).

Such a directory holds ``model.gguf``, an Ollama ``Modelfile``, ``quantization.json`` (backend
"gguf") and the Hugging Face tokenizer. ``generate``, ``bench`` and ``serve`` run it through llama.cpp
(``llama-cpp-python``, the ``llamacpp`` extra, built from source), so every figure is the file
as llama.cpp or Ollama would run it; without the extra it is exit 2 naming the extra. A plain
``.gguf`` file given as a model path is not this: it is imported into a Hugging Face directory
(``llmctl.gguf``) and runs like any other model, extra or not.

:class:`LlamaCppModel` has the parts of a transformers causal LM those commands use:
``generate`` (greedy or sampled, forced lengths, stop strings; no beam search), a forward pass
giving logits (perplexity, lm-eval; a second llama.cpp context that keeps every position's
logits, made on first use), ``config`` (positions) and ``device``. The tokenizer stays the
Hugging Face one saved beside the file: prompts are token ids, so templates, chat templates
and token counts are the same as for every other backend.
"""

from __future__ import annotations

import atexit
import os
import types
import weakref
from pathlib import Path
from typing import Iterator

import torch

from llmctl.errors import UserError
from llmctl.gguf import read_metadata

EXTRA = ("pip install 'llmctl[llamacpp]' (llama-cpp-python, built from source: `make "
         "install-llamacpp` picks the CMAKE_ARGS for this CPU, docs/quantization.md says which)")
# llama.cpp allocates a context's KV cache (and, when scoring, logits for every position) up
# front: 4,096 positions of SmolLM2-135M are 94 MB of f16 KV cache, and its scoring context
# 0.8 GB of f32 logits. The model's own limit applies when it is lower.
MAX_CONTEXT = 4096


def available() -> bool:
    # OpenMP threads that sleep at a barrier instead of spinning, unless the environment says
    # otherwise (read once, when llama.cpp's libgomp loads). Spinning threads starve each other
    # when the machine has more runnable threads than cores: on the 2-core AMX Xeon at load
    # average 14, 2 threads took over 300 s for 16 tokens of SmolLM2-135M spinning and 3.7 s
    # sleeping.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require(path: str | Path, key: str = "model") -> None:
    """Exit 2 naming the extra when llama-cpp-python is not installed."""
    if not available():
        raise UserError(f"{key}: {path} is a GGUF model, which llmctl runs through llama.cpp: "
                        f"{EXTRA}")


def load(file: str | Path) -> "LlamaCppModel":
    """A GGUF quantize output's file under llama.cpp (exit 2 without the extra)."""
    require(Path(file).parent)
    if not Path(file).is_file():
        raise UserError(f"{Path(file).parent}: no {Path(file).name} in this GGUF quantize output")
    return LlamaCppModel(Path(file))


# Every model still open when Python exits is closed first: llama-cpp-python frees a model
# from its __del__, which at interpreter shutdown finds its C bindings already torn down and
# prints a TypeError traceback ("Exception ignored in: <function Llama.__del__>").
_OPEN: "weakref.WeakSet[LlamaCppModel]" = weakref.WeakSet()


@atexit.register
def _close_open_models() -> None:
    for model in list(_OPEN):
        model.close()


def threads() -> int:
    """Every core this process may use (llama-cpp-python's default is half of them)."""
    return len(os.sched_getaffinity(0))


class LlamaCppModel:
    """A GGUF file under llama.cpp, shaped like the transformers models llmctl decodes."""

    device = torch.device("cpu")
    supports_beam_search = False

    def __init__(self, gguf: Path):
        self.path = Path(gguf)
        self.llama = self._context(logits_all=False)
        self._scorer = None  # the logits-for-every-position context, made on first forward
        _OPEN.add(self)
        self.config = types.SimpleNamespace(
            model_type=self.llama.metadata.get("general.architecture", "llama"),
            max_position_embeddings=self.llama.n_ctx(), vocab_size=self.llama.n_vocab())
        self.name_or_path = str(self.path)

    def _context(self, logits_all: bool):
        available()  # its OpenMP setting first
        from llama_cpp import Llama

        meta = read_metadata(self.path)
        trained = meta.get(f"{meta.get('general.architecture')}.context_length")
        positions = min(trained, MAX_CONTEXT) if isinstance(trained, int) else MAX_CONTEXT
        try:
            return Llama(model_path=str(self.path), n_ctx=positions,
                         n_threads=threads(), n_threads_batch=threads(),
                         logits_all=logits_all, verbose=False)
        except (ValueError, RuntimeError) as err:  # llama.cpp: "Failed to load model from file"
            raise UserError(f"{self.path}: llama.cpp cannot load it "
                            f"({' '.join(str(err).split())[:200]})") from None

    def close(self) -> None:
        """Free llama.cpp's contexts and model now (again later is a no-op)."""
        for context in (self.llama, self._scorer):
            if context is not None:
                context.close()
        self._scorer = None

    # -- what transformers models offer and llmctl uses --------------------------------------

    def eval(self) -> "LlamaCppModel":
        return self

    def to(self, *args, **kwargs) -> "LlamaCppModel":
        return self  # llama.cpp runs where it was built to (here: the CPU)

    def tie_weights(self) -> None:
        """lm-eval calls this on a torch model; a GGUF file's weights are as they were saved."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> types.SimpleNamespace:
        """Logits (batch x length x vocab, float32) for every position; rows are scored one at
        a time, only the positions the mask keeps (the others get zeros)."""
        if self._scorer is None:
            self._scorer = self._context(logits_all=True)
        scorer = self._scorer
        logits = torch.zeros(*input_ids.shape, scorer.n_vocab())
        for row in range(input_ids.shape[0]):
            keep = (attention_mask[row].bool() if attention_mask is not None
                    else torch.ones(input_ids.shape[1], dtype=torch.bool))
            tokens = input_ids[row][keep].tolist()
            if len(tokens) > scorer.n_ctx():
                raise UserError(f"{self.path}: {len(tokens)} tokens to score, more than the "
                                f"{scorer.n_ctx()} positions of llmctl's llama.cpp context")
            scorer.reset()
            scorer.eval(tokens)
            logits[row, keep] = torch.from_numpy(scorer.scores[:len(tokens)].copy())
        return types.SimpleNamespace(logits=logits)

    def stream(self, prompt: list[int], max_new_tokens: int, *, forced: bool = False,
               eos_token_id: int | list[int] | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Iterator[int]:
        """New token ids for one prompt, as llama.cpp decodes them: greedy at temperature 0,
        else sampled; through the first eos unless ``forced`` (exactly ``max_new_tokens``)."""
        eos = set(eos_token_id if isinstance(eos_token_id, list) else
                  [eos_token_id] if eos_token_id is not None else [])
        if seed is not None:
            self.llama.set_seed(seed)
        # reset(): a fresh prompt pass each time (llama-cpp-python would reuse a cached prefix)
        self.llama.reset()
        produced = 0
        for token in self.llama.generate(prompt, temp=temperature, top_p=top_p, top_k=top_k,
                                         min_p=0.0, repeat_penalty=1.0, reset=True):
            yield token
            produced += 1
            if produced >= max_new_tokens or (token in eos and not forced):
                return

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config=None, tokenizer=None, **kwargs) -> torch.Tensor:
        """transformers' ``generate`` for the settings llama.cpp has: each row (its padding
        dropped) decoded on its own, ``num_return_sequences`` times; the result is the
        prompts and the new tokens, right-padded with eos, as transformers returns them."""
        config = generation_config
        if (config.num_beams or 1) > 1:
            raise UserError("generate.num_beams: llama.cpp decodes greedy or sampled, "
                            "without beam search (num_beams = 1)")
        if config.repetition_penalty not in (None, 1.0) or config.no_repeat_ngram_size:
            raise UserError("generate.repetition_penalty / no_repeat_ngram_size: not applied "
                            "by llmctl's llama.cpp runtime (leave them at their defaults)")
        forced = bool(config.min_new_tokens) and config.min_new_tokens == config.max_new_tokens
        if config.min_new_tokens and not forced:
            raise UserError("generate.min_new_tokens: llmctl's llama.cpp runtime forces a length "
                            "(min = max new tokens) or stops at eos")
        eos = config.eos_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else \
            (eos[0] if isinstance(eos, list) else eos) or 0
        sample = dict(temperature=config.temperature or 1.0, top_p=config.top_p or 1.0,
                      top_k=config.top_k or 0) if config.do_sample else {}
        stops = list(config.stop_strings or []) if tokenizer is not None else []
        rows = []
        for row in range(input_ids.shape[0]):
            keep = (attention_mask[row].bool() if attention_mask is not None
                    else torch.ones(input_ids.shape[1], dtype=torch.bool))
            prompt = input_ids[row][keep].tolist()
            for _ in range(config.num_return_sequences or 1):
                new: list[int] = []
                for token in self.stream(prompt, config.max_new_tokens, forced=forced,
                                         eos_token_id=eos, **sample):
                    new.append(token)
                    if stops and any(s in tokenizer.decode(new, skip_special_tokens=True)
                                     for s in stops):
                        break
                rows.append(input_ids[row].tolist() + new)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])
