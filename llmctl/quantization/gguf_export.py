"""``backend = "gguf"``: one GGUF file for llama.cpp and Ollama, written with the ``gguf``
package, plus an Ollama ``Modelfile`` beside it.

The file has llama.cpp's tensor names and layout for the architecture (``gguf.tensor_mapping``),
including the row order llama.cpp's rotary embedding expects of Llama-family query and key
projections (its converter's ``LlamaModel.permute``), the tokenizer (byte-level BPE, llama.cpp's
``gpt2`` model: SmolLM2, Llama 3, Qwen2), its special token ids and the chat template.

Each trial is scored on the file itself: with the ``llamacpp`` extra installed, under llama.cpp
(:mod:`llmctl.quantization.llamacpp`), as llama.cpp and Ollama will run it, its kernels' own
arithmetic and f16 KV cache included; without it, read back through llmctl's own GGUF import
(``llmctl.gguf``, the same dequantization as any other GGUF input, scored in fp32), so rounding,
layout and tokenizer metadata are in the figure but llama.cpp's arithmetic is not. Each trial in
``trials.json`` names which (``scored_by``). ``generate``, ``bench`` and ``serve`` run the output
through llama.cpp.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmctl.errors import UserError
from llmctl.quantization.common import QuantizeBackend
from llmctl.schema import QuantizeCommon

GGUF_FILE = "model.gguf"  # in the quantize stage's model/ directory, beside the Modelfile
MODELFILE = "Modelfile"
# Most aggressive first: the ladder walks from the recipe's method toward the end (more bits).
# bf16 before f16: both 16 bits, f16 keeps three more mantissa bits for weights' small range.
METHODS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16")
# llama.cpp architectures the export writes, by transformers model_type (qwen2: no Q/K
# permutation). Not mistral, though llama.cpp runs it as llama: transformers 5.5 cannot read a
# llama-architecture GGUF whose general.name says mistral back, so no trial could be scored.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
PERMUTED = ("llama",)  # rotary embedding on interleaved pairs in llama.cpp: rows reordered
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre), by the regex a tokenizer.json splits
# with before its byte-level step: what tells llama.cpp how to split text into words.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
               r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
TOKENIZER_KINDS = ("byte-level BPE with GPT-2's word split (pre \"gpt-2\"), GPT-2's with single "
                   "digits (\"smollm\", SmolLM2), Llama 3's (\"llama-bpe\") or Qwen2's (\"qwen2\")")


def _qtype(method: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, method.upper())


class GgufQuantize(QuantizeCommon):
    """One GGUF file for llama.cpp and Ollama (llama and qwen2 models)."""

    backend: Literal["gguf"] = Field(..., description="the quantization backend")
    method: Literal["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "bf16", "f16"] = Field(
        "q8_0", description="llama.cpp's weight type: q8_0 (8.5 bits per weight), q5_1, q5_0, "
        "q4_1, q4_0 (4.5), or bf16 / f16; the trials go on toward more bits")


class Gguf(QuantizeBackend):
    name, table, label = "gguf", GgufQuantize, "GGUF"
    runtime = "llama.cpp"  # generate, bench and serve run the file as llama.cpp and Ollama do

    def check(self) -> None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError("quantize.backend: \"gguf\" needs the gguf package: "
                            "pip install gguf") from None

    def check_model(self, path: str, key: str) -> None:
        """Exit 2 for an architecture llama.cpp cannot run (or this export cannot write)."""
        model_type = source_model_type(path)
        if model_type is not None and model_type not in ARCHITECTURES:
            raise UserError(f"{key}: {path} is a {model_type} model, which backend \"gguf\" "
                            f"cannot export for llama.cpp (it exports "
                            f"{', '.join(ARCHITECTURES)})")

    def ladder(self, cfg, base: dict[str, Any], model) -> list[dict[str, Any]]:
        """The recipe's method, then each one with more bits: q4_0 q4_1 q5_0 q5_1 q8_0 bf16
        f16."""
        return [{**base, "method": m} for m in METHODS[METHODS.index(base["method"]):]]

    def quantize(self, model, source_dir: str, settings: dict[str, Any], calibration):
        from llmctl.models import load_tokenizer

        folder = Path(tempfile.mkdtemp(prefix="llmctl-gguf-"))
        file = export_gguf(model, load_tokenizer(source_dir), folder / GGUF_FILE,
                           settings["method"])
        from llmctl.quantization import llamacpp

        if llamacpp.available():
            qmodel = llamacpp.load(file)
            qmodel.llmctl_scored_by = "llama.cpp"
        else:
            qmodel = read_back(file, folder / "imported")
            qmodel.llmctl_scored_by = "llmctl's GGUF import, fp32 (no llamacpp extra)"
        qmodel.llmctl_gguf = file
        weakref.finalize(qmodel, shutil.rmtree, folder, True)  # a rejected trial's files too
        return qmodel

    def save(self, qmodel, out_dir: Path, tokenizer) -> None:
        shutil.copyfile(qmodel.llmctl_gguf, out_dir / GGUF_FILE)
        (out_dir / MODELFILE).write_text(modelfile(tokenizer, GGUF_FILE))

    def load(self, path: Path, settings: dict[str, Any]):
        """The file under llama.cpp, as llama.cpp and Ollama run it (exit 2 without the
        ``llamacpp`` extra)."""
        from llmctl.quantization import llamacpp

        return llamacpp.load(Path(path) / GGUF_FILE)

    def runtime_ready(self, path: Path) -> bool:
        from llmctl.quantization import llamacpp

        return llamacpp.available()

    def check_runtime(self, path: str, key: str) -> None:
        from llmctl.quantization import llamacpp

        llamacpp.require(path, key)

    def describe(self, settings: dict[str, Any]) -> str:
        return f"gguf {settings['method']}"  # the method names its bits


BACKEND = Gguf()


def read_back(file: Path, out_dir: Path):
    """The GGUF read back through llmctl's import into ``out_dir`` (not the shared cache: a
    trial's file is scored once and deleted)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmctl.gguf import convert, read_metadata

    convert(file, read_metadata(file), out_dir)
    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()


def source_model_type(path: str) -> str | None:
    """The ``model_type`` of a local model, adapter (its base's) or GGUF file; None when it
    cannot be told without loading (a hub id)."""
    from llmctl.gguf import is_gguf, read_metadata
    from llmctl.models import adapter_base, is_adapter_dir

    if is_gguf(path):
        return read_metadata(path).get("general.architecture") if Path(path).is_file() else None
    if is_adapter_dir(path):
        path = adapter_base(path)
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # no such local model, or check_loadable names the broken config


# -- the export -------------------------------------------------------------------------------


def export_gguf(model, tokenizer, path: str | Path, method: str) -> Path:
    """Write ``model`` (a transformers causal LM of an architecture in ARCHITECTURES) and its
    ``tokenizer`` as one GGUF file at ``path``, 2-D weights in ``method`` (METHODS)."""
    import gguf

    if method not in METHODS:
        raise UserError(f"quantize.method: {method!r} is not a GGUF method "
                        f"({', '.join(METHODS)})")
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"quantize.model: a {config.model_type} model, which backend \"gguf\" "
                        f"cannot export for llama.cpp (it exports {', '.join(ARCHITECTURES)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    write_hyperparameters(writer, config, method)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    write_tokenizer(writer, tokenizer, vocab_rows)
    write_tensors(writer, model, arch, method)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hyperparameters(writer, config, method: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"quantize.model: rotary scaling {rope.get('rope_type')!r} is not "
                        f"exported to GGUF (only unscaled rotary embeddings)")
    # the directory's name only: a file meant for sharing carries no local path
    writer.add_name(Path(getattr(config, "_name_or_path", "") or config.model_type).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{method.upper()}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_tensors(writer, model, arch: str, method: str) -> None:
    """Every weight under llama.cpp's name; 1-D tensors (norms, biases) in f32 as llama.cpp's
    converter keeps them; the embedding and output in q8_0 at the 4- and 5-bit methods (llama.cpp's
    quantizer keeps the output at 6 bits, a K-quant the gguf package cannot write)."""
    import gguf

    config = model.config
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd when there is no output tensor
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"quantize.model: no llama.cpp tensor for {name} ({arch})")
        data = tensor.detach().float().cpu().numpy()
        if arch in PERMUTED and ".self_attn.q_proj." in name:
            data = permute(data, heads, heads)
        elif arch in PERMUTED and ".self_attn.k_proj." in name:
            data = permute(data, heads, kv_heads)
        values, raw_dtype = encode(data, tensor_method(gguf_name, data, method))
        writer.add_tensor(gguf_name, values, raw_dtype=raw_dtype)


def tensor_method(gguf_name: str, data, method: str) -> str:
    if data.ndim < 2:
        return "f32"
    if method.startswith(("q4", "q5")) and gguf_name.startswith(("token_embd.", "output.")):
        return "q8_0"
    return method


def encode(data, method: str):
    """(values or bytes, their GGML type) of ``data`` in ``method``; a row
    length the block size does not divide falls back to f16, as llama.cpp's converter does."""
    import gguf

    import numpy as np

    if method == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, _qtype(method)), _qtype(method)
    except gguf.QuantError:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def permute(weights, n_head: int, n_head_kv: int):
    """Query/key rows from transformers' rotary layout (each head's first half, then its
    second) to llama.cpp's (the two halves interleaved), as llama.cpp's converter does."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tokenizer(writer, tokenizer, vocab_rows: int) -> None:
    """Byte-level BPE vocabulary (tokens, types, merges), special token ids, add-bos/eos and
    the chat template; rows of the embedding beyond the vocabulary get ``[PAD<i>]`` tokens."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model") or {}
    pre = pre_tokenizer_name(state.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or state.get("normalizer") not in (
            None, {"type": "Sequence", "normalizers": []}):
        raise UserError(f"quantize.model: its tokenizer ({type(tokenizer).__name__}, "
                        f"{model.get('type', 'no tokenizers backend')}) is not one backend "
                        f"\"gguf\" exports; it exports {TOKENIZER_KINDS}")
    vocab = tokenizer.get_vocab()
    size = max(vocab_rows, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if index is not None:
            add(index)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(probe) > 1 and probe[-1] == tokenizer.eos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, None when it has none."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    if not steps or steps[-1] is None or steps[-1].get("type") != "ByteLevel" \
            or steps[-1].get("add_prefix_space"):
        return None
    byte_level, before = steps[-1], steps[:-1]
    if byte_level.get("use_regex", True):
        if not before:
            return "gpt-2"
        if before == [{"type": "Digits", "individual_digits": True}]:
            return "smollm"
        return None
    if len(before) == 1 and before[0].get("type") == "Split" \
            and before[0].get("behavior") == "Isolated":
        return SPLIT_PRE.get((before[0].get("pattern") or {}).get("Regex"))
    return None


# -- Ollama -----------------------------------------------------------------------------------

# Ollama's own Go templates for the two chat formats llmctl's models use; any other chat
# template is left to Ollama, which picks its template from the file's tokenizer.chat_template.
CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}<|im_start|>assistant\n")
LLAMA3 = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
          "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


def modelfile(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF beside it: FROM, TEMPLATE (ChatML or Llama 3; else
    Ollama's own choice from the file's chat template) and a stop at the end-of-turn token."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    lines = [f"FROM ./{gguf_name}"]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{CHATML}"""')
        stops.append("<|im_end|>")
    elif "<|start_header_id|>" in template:
        lines.append(f'TEMPLATE """{LLAMA3}"""')
        stops.append("<|eot_id|>")
    elif template:
        lines.append("# TEMPLATE: Ollama takes it from the GGUF's tokenizer.chat_template")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
