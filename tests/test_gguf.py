"""GGUF files as a model source: converted once, special tokens from the file's metadata,
the same greedy text as transformers' own GGUF load, and a truncated file is exit 2."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import manifest, recipe_head, run_cli

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_gguf(path: Path, tokenizer_dir: str, seed: int = 0) -> Path:
    """A 2-layer Llama in GGUF, with the demo's byte-level BPE vocabulary, eos <|im_end|>, no
    bos prepended and a ChatML template: what a llama.cpp export of a chat model carries."""
    import gguf

    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [s for s in SPECIALS if s not in spec["model"]["vocab"]]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    n_vocab, dim, ff, heads, kv_heads, layers = len(tokens), 64, 128, 4, 2, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape):
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32) if len(shape) > 1 \
            else np.ones(shape, dtype=np.float32)
        writer.add_tensor(name, data)

    tensor("token_embd.weight", n_vocab, dim)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", dim)
        tensor(f"blk.{i}.attn_q.weight", dim, dim)
        tensor(f"blk.{i}.attn_k.weight", dim // heads * kv_heads, dim)
        tensor(f"blk.{i}.attn_v.weight", dim // heads * kv_heads, dim)
        tensor(f"blk.{i}.attn_output.weight", dim, dim)
        tensor(f"blk.{i}.ffn_norm.weight", dim)
        tensor(f"blk.{i}.ffn_gate.weight", ff, dim)
        tensor(f"blk.{i}.ffn_up.weight", ff, dim)
        tensor(f"blk.{i}.ffn_down.weight", dim, ff)
    tensor("output_norm.weight", dim)
    tensor("output.weight", n_vocab, dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, assets):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf", assets["tokenizer"])


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "cache"))


def test_conversion_takes_special_tokens_from_the_metadata(tiny_gguf):
    from transformers import AutoTokenizer

    from llmctl.gguf import converted

    out = Path(converted(tiny_gguf))
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    source = json.loads((out / "gguf_source.json").read_text())
    from llmctl.fingerprint import file_sha256

    assert source["sha256"] == file_sha256(tiny_gguf)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert tokenizer("hello world")["input_ids"][0] != tokenizer.convert_tokens_to_ids(
        "<|im_start|>")  # no bos prepended
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # converted once: the second call finds the cache
    stamp = (out / "gguf_source.json").stat().st_mtime_ns
    assert converted(tiny_gguf) == str(out)
    assert (out / "gguf_source.json").stat().st_mtime_ns == stamp


def test_converted_tokenizer_converts_for_openvino_genai(tiny_gguf):
    """transformers gave a byte-level BPE GGUF's decoder SentencePiece steps that
    openvino-tokenizers cannot convert ("index '2' out of range"): openvino-genai could not
    decode SmolLM2 after quantize. Without them the decoder gives the same text."""
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    from llmctl.gguf import converted

    tokenizer = AutoTokenizer.from_pretrained(converted(tiny_gguf))
    decoder = json.loads(tokenizer.backend_tokenizer.to_str())["decoder"]
    assert [d["type"] for d in decoder["decoders"]] == ["ByteLevel", "Strip"]  # prefix space
    convert_tokenizer(tokenizer, with_detokenizer=True)
    text = "hello world, and more text"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_generate_matches_transformers_own_gguf_load(tiny_gguf, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tmp_path / "g.toml"
    recipe.write_text(recipe_head(tmp_path / "run", "gguf") + f"""
[generate]
model = "{tiny_gguf}"
max_new_tokens = 8
""")
    code, out, err = run_cli(["generate", recipe, "-p", "def merge", "--json"], capsys)
    assert code == 0, err
    ours = json.loads(out)["completions"][0]
    # transformers' own load, with the special-token fix applied by hand
    kwargs = dict(gguf_file=tiny_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, **kwargs)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.add_bos_token = False
    model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, dtype=torch.float32, **kwargs)
    ids = tokenizer("def merge", return_tensors="pt", return_token_type_ids=False)
    new = model.generate(**ids, max_new_tokens=8, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
    assert ours == tokenizer.decode(new, skip_special_tokens=True)
    inputs = manifest(tmp_path / "run" / "generate")["fingerprint"]["inputs"]
    assert inputs[str(tiny_gguf)]["content"]  # the source file's digest is recorded


def test_truncated_gguf_is_exit_2_naming_the_file(tiny_gguf, tmp_path, capsys):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:4000])
    recipe = tmp_path / "g.toml"
    recipe.write_text(recipe_head(tmp_path / "run", "gguf") + f"""
[generate]
model = "{broken}"
""")
    for extra in ([], ["--dry-run"]):
        code, _, err = run_cli(["generate", recipe, "-p", "x", *extra], capsys)
        assert code == 2 and f"{broken}: not a readable GGUF file" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert not os.listdir(tmp_path / "cache") if (tmp_path / "cache").exists() else True
