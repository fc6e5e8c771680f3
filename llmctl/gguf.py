"""GGUF files (llama.cpp, Ollama) as a model source: converted once into a cached Hugging Face
directory that every stage loads like any other.

transformers reads a GGUF's weights (dequantized) and rebuilds its tokenizer, but gets the
special tokens wrong for some models (SmolLM2: eos and bos both become ``<|im_start|>`` and a
bos is prepended, where the file says eos ``<|im_end|>`` and no bos). So llmctl takes eos,
bos, pad, add-bos and the chat template from the file's own metadata (read with the ``gguf``
package), saves weights as safetensors with the fixed tokenizer, and records the file's
digest in ``gguf_source.json``. The cache is keyed by that digest and by CONVERSION: an
edited file converts again, the same file never does (until llmctl's conversion changes).

For a byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``, SmolLM2's) transformers
also gives the decoder SentencePiece steps (byte fallback, fuse, "▁" -> " ") ahead of the
byte-level one. They change nothing for such a vocabulary (it has no ``<0x..>`` or "▁"
tokens), but openvino-tokenizers cannot convert that chain, so openvino-genai could not
decode the quantized model; the converted tokenizer keeps the byte-level decoder (and a final
strip of the prefix space, where there is one), as the model's own Hugging Face tokenizer has.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmctl.errors import UserError
from llmctl.fingerprint import file_sha256

SOURCE = "gguf_source.json"
# bumped when a conversion's output changes: 2, no SentencePiece decoder steps; 3, the generic
# tokenizer class (transformers 5)
CONVERSION = 3


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def cache_root() -> Path:
    """``$LLMCTL_CACHE`` or ``~/.cache/llmctl`` (``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get("LLMCTL_CACHE"):
        return Path(os.environ["LLMCTL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmctl"


def read_metadata(path: str | Path, key: str = "model") -> dict[str, Any]:
    """The GGUF's key/value metadata (token lists left out); a truncated or foreign file is
    exit 2 naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: {path} does not exist")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"{key}: {path}: reading GGUF needs the gguf package: "
                        f"pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        fields = {}
        for name, field in reader.fields.items():
            if name in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                        "tokenizer.ggml.scores"):
                continue
            fields[name] = field.contents()
    except Exception as err:  # noqa: BLE001 - gguf raises ValueError, IndexError, struct errors
        raise UserError(f"{key}: {path}: not a readable GGUF file (truncated or corrupt: "
                        f"{' '.join(str(err).split())[:160]})") from None
    return fields


def special_tokens(meta: dict[str, Any]) -> dict[str, Any]:
    """eos/bos/pad tokens, add-bos and the chat template, as the GGUF's metadata says."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    out: dict[str, Any] = {}
    for name in ("eos", "bos", "padding", "unknown"):
        index = meta.get(f"tokenizer.ggml.{name}_token_id")
        if isinstance(index, int) and 0 <= index < len(tokens):
            out[{"padding": "pad", "unknown": "unk"}.get(name, name) + "_token"] = tokens[index]
    if "tokenizer.ggml.add_bos_token" in meta:
        out["add_bos_token"] = bool(meta["tokenizer.ggml.add_bos_token"])
    if meta.get("tokenizer.chat_template"):
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def converted(path: str | Path, key: str = "model") -> str:
    """The cached Hugging Face directory for a GGUF file, converting it the first time."""
    path = Path(path).resolve()
    meta = read_metadata(path, key)
    digest = file_sha256(path)
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}-c{CONVERSION}"
    if (target / SOURCE).is_file():
        return str(target)
    from llmctl.progress import console

    console.print(f"  converting {path.name} to a Hugging Face directory in {target} (once)")
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert(path, meta, staging)
        (staging / SOURCE).write_text(json.dumps(
            {"file": path.name, "sha256": digest, "special_tokens": {
                k: v for k, v in special_tokens(meta).items() if k != "chat_template"}},
            indent=2) + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a half-written directory of an earlier, killed conversion
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def convert(path: Path, meta: dict[str, Any], out_dir: Path) -> None:
    """Weights (dequantized to fp32) and the tokenizer with the metadata's special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    kwargs = dict(gguf_file=path.name)
    try:
        # The generic class: transformers 5's AutoTokenizer names a GGUF's tokenizer by
        # architecture (CodeLlamaTokenizer for SmolLM2), adds that class's own special tokens
        # and, loaded back, rebuilds its pipeline from the class's recipe (SentencePiece's
        # Metaspace: every space of a byte-level BPE text became <unk>). This one keeps the
        # pipeline built from the file, as tokenizer.json holds it.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32,
                                                     **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{path}: transformers cannot convert this GGUF "
                        f"({' '.join(str(err).split())[:200]})") from None
    fix_tokenizer(tokenizer, special_tokens(meta))
    if meta.get("tokenizer.ggml.model") == "gpt2":
        byte_level_decoder(tokenizer)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def byte_level_decoder(tokenizer) -> None:
    """Drop the SentencePiece steps transformers puts in a byte-level BPE's decoder, when the
    vocabulary makes them no-ops (no "▁" and no ``<0x..>`` tokens); a final Strip stays."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    steps = state.get("decoder") or {}
    if steps.get("type") != "Sequence" or any(
            "\u2581" in token or token.startswith("<0x") for token in tokenizer.get_vocab()):
        return
    kept = [d for d in steps["decoders"] if d["type"] not in ("ByteFallback", "Fuse", "Replace")]
    state["decoder"] = kept[0] if len(kept) == 1 else {"type": "Sequence", "decoders": kept}
    tokenizer.backend_tokenizer.decoder = Tokenizer.from_str(json.dumps(state)).decoder


def fix_tokenizer(tokenizer, special: dict[str, Any]) -> None:
    for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
        if name in special:
            setattr(tokenizer, name, special[name])
    if "add_bos_token" in special and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = special["add_bos_token"]  # (fast Llama: rebuilds its template)
    if "chat_template" in special:
        tokenizer.chat_template = special["chat_template"]
