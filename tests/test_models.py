"""llmctl.models: loading, saving, dtypes and the errors a bad model path gets (tiny models, no
demo assets: the fast tier)."""

import types
from pathlib import Path

import pytest
import torch

from llmctl.errors import UserError


def logits(model, tokenizer, text="The function returns"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_save_writes_safetensors_only_and_loads_back_the_same_model(tiny_lm, tmp_path):
    from llmctl.models import load_causal_lm, load_tokenizer, save_model

    model, tokenizer = load_causal_lm(str(tiny_lm)).eval(), load_tokenizer(str(tiny_lm))
    save_model(model, tokenizer, tmp_path / "copy")
    files = {p.name for p in (tmp_path / "copy").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    again = load_causal_lm(str(tmp_path / "copy")).eval()
    assert torch.equal(logits(model, tokenizer), logits(again, tokenizer))


def test_pickled_weights_are_refused_unless_the_recipe_allows_them(tiny_lm, tmp_path):
    from llmctl.models import load_causal_lm, load_tokenizer
    from llmctl.schema import ModelConfig

    model = load_causal_lm(str(tiny_lm))
    # transformers 5 saves safetensors only: write the pickle as older tools and checkpoints do
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    load_tokenizer(str(tiny_lm)).save_pretrained(tmp_path / "pickled")
    with pytest.raises(UserError, match="pytorch_model.bin|pickle"):
        load_causal_lm(str(tmp_path / "pickled"))
    loaded = load_causal_lm(str(tmp_path / "pickled"), ModelConfig(allow_pickle=True))
    assert loaded.config.num_hidden_layers == 2


def test_dtype_setting_takes_effect(tiny_lm):
    from llmctl.models import load_causal_lm
    from llmctl.schema import ModelConfig

    assert {p.dtype for p in load_causal_lm(str(tiny_lm), dtype="bfloat16").parameters()} == {
        torch.bfloat16}
    assert {p.dtype for p in load_causal_lm(str(tiny_lm), ModelConfig(dtype="float32")).parameters()
            } == {torch.float32}


def test_course_bf16_load_keeps_norms_and_biases_in_fp32(tiny_lm):
    """sft's `load_in_bf16` + `fp32_norms_and_head`: matrices bf16, every 1-D parameter fp32."""
    from llmctl.schema import SftConfig
    from llmctl.stages.sft import load_base_model

    cfg = SftConfig(data="x", load_in_bf16=True, fp32_norms_and_head=True)
    model = load_base_model(str(tiny_lm), types.SimpleNamespace(model=None), cfg)
    dtypes = {p.ndim == 1: set() for p in model.parameters()}
    for p in model.parameters():
        dtypes[p.ndim == 1].add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}


@pytest.mark.parametrize("make, match", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "config.json"),
])
def test_broken_model_directories_are_user_errors_naming_the_path(tmp_path, make, match):
    from llmctl.models import check_model_dir

    folder = tmp_path / "model"
    make(folder)
    with pytest.raises(UserError, match=match) as err:
        check_model_dir(str(folder), key="sft.model")
    assert str(folder) in str(err.value)


def test_truncated_safetensors_is_a_user_error(tiny_lm, tmp_path):
    import shutil

    from llmctl.models import check_model_dir

    copy = Path(shutil.copytree(tiny_lm, tmp_path / "model"))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="model.safetensors"):
        check_model_dir(str(copy), key="sft.model")


def test_config_override_typo_names_the_key():
    from llmctl.models import check_config_overrides

    with pytest.raises(UserError, match=r"pretrain\.config\.num_layerz: not a field of OPTConfig"):
        check_config_overrides("opt", {"num_layerz": 2}, "pretrain.config")


def test_tied_embeddings_are_counted_once(tiny_lm):
    from llmctl.models import count_params, human_count, load_causal_lm

    model = load_causal_lm(str(tiny_lm))
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_params(model) == sum(unique.values())
    assert count_params(model, trainable_only=True) == count_params(model)
    assert human_count(134_500_000) == "134.5M" and human_count(999) == "999"


def test_bf16_on_a_cpu_without_it_warns_once_and_keeps_the_choice(monkeypatch, capsys):
    from llmctl import models

    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    models._warn_slow_bf16.cache_clear()
    assert models.resolve_precision("bf16") == "bf16"
    assert models.resolve_precision("bf16") == "bf16"
    err = capsys.readouterr().err
    assert err.count("warning: precision = \"bf16\" on a CPU without AVX512-BF16 or AMX") == 1
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    models._warn_slow_bf16.cache_clear()
    assert models.resolve_precision("bf16") == "bf16" and capsys.readouterr().err == ""
