"""llmctl.quantization as a library: the torch INT8 backend's quantize/save/load round trip, the
trial ladder, and the refusals (tiny models, no demo assets: the fast tier). The backends end
to end through `llmctl quantize` are in tests/stages/test_quantize.py."""

import json
import os

import pytest
import torch

from llmctl.errors import UserError


def settings(**extra):
    return {"backend": "torch", "method": "dynamic", "bits": 8, "group_size": 128, "sym": True,
            "fp32_modules": [], **extra}


def test_torch_int8_round_trip_is_exact_and_smaller(tiny_lm, tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from llmctl import quantization
    from llmctl.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(tiny_lm)).eval(), load_tokenizer(str(tiny_lm))
    chosen = settings(fp32_modules=["lm_head", "model.decoder.layers.0"])
    qmodel = quantization.quantize(model, str(tiny_lm), chosen)
    int8 = {n for n, m in qmodel.named_modules() if isinstance(m, DynamicLinear)}
    assert int8 and all(n.startswith("model.decoder.layers.1.") for n in int8)
    assert isinstance(qmodel.model.decoder.layers[0].fc1, torch.nn.Linear)
    assert isinstance(model.model.decoder.layers[1].fc1, torch.nn.Linear)  # the source is untouched

    quantization.save(qmodel, chosen, tmp_path / "q", tokenizer)
    assert json.loads((tmp_path / "q" / quantization.MARKER).read_text()) == chosen
    loaded = quantization.load_model(str(tmp_path / "q"))  # generate/bench/serve read the marker
    ids = tokenizer("The function returns", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(qmodel(**ids).logits, loaded(**ids).logits)
        assert not torch.equal(qmodel(**ids).logits, model(**ids).logits)


def test_int8_weights_take_a_quarter_of_the_bytes(tiny_lm, tmp_path):
    from llmctl import quantization
    from llmctl.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(tiny_lm))
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # The head stays fp32 and tied: a quantized head of a tied model is an extra int8 copy.
    chosen = settings(fp32_modules=["lm_head"])
    qmodel = quantization.quantize(model, str(tiny_lm), chosen)
    quantization.save(qmodel, chosen, tmp_path / "q", load_tokenizer(str(tiny_lm)))
    saved = quantization.weight_bytes(tmp_path / "q")
    # int8 weights save 3 of every 4 bytes of each quantized matrix; per-row scales and zero
    # points (5 bytes a row) and longer tensor names cost back ~10% at hidden size 32.
    assert quantization.weight_bytes(tiny_lm) - saved > 0.6 * linear_bytes


def test_ladder_falls_back_the_head_then_layers_from_both_ends(tiny_lm):
    from llmctl.models import load_causal_lm
    from llmctl.quantization import trial_settings
    from llmctl.quantization.torch_dynamic import TorchQuantize

    ladder = trial_settings(TorchQuantize(backend="torch"), load_causal_lm(str(tiny_lm)))
    assert [s["fp32_modules"] for s in ladder] == [
        [], ["lm_head"], ["lm_head", "model.decoder.layers.0"],
        ["lm_head", "model.decoder.layers.0", "model.decoder.layers.1"]]
    capped = TorchQuantize(backend="torch", max_trials=2)
    assert len(trial_settings(capped, load_causal_lm(str(tiny_lm)))) == 2


def test_calibrated_methods_need_calibration_data(tiny_lm):
    from llmctl import quantization

    with pytest.raises(UserError, match="quantize.calibration: gptq needs calibration data"):
        quantization.quantize(None, str(tiny_lm), settings(backend="inc", method="gptq"))


def test_unknown_backend_in_a_saved_model_names_the_file(tmp_path):
    from llmctl import quantization

    (tmp_path / quantization.MARKER).write_text(json.dumps({"backend": "tensorrt"}))
    with pytest.raises(UserError, match=r"quantization\.json: unknown backend 'tensorrt'"):
        quantization.load(tmp_path)
    with pytest.raises(UserError, match="quantize.backend: unknown backend 'tensorrt'"):
        quantization.check_supported("tensorrt")


def test_openvino_model_decodes_in_openvino_genai_as_optimum_intel_does(tiny_lm, tmp_path):
    """`quantize` with the openvino backend saves the tokenizer as OpenVINO IR beside the
    model, so openvino-genai's LLMPipeline opens the directory as it is; llmctl's generate then
    decodes in it (the optimum-intel model is never compiled) and gives the tokens optimum-intel
    gives, greedy and beam search."""
    pytest.importorskip("openvino_genai")
    from transformers import GenerationConfig

    from llmctl import quantization
    from llmctl.models import load_causal_lm, load_tokenizer
    from llmctl.quantization.openvino import genai_pipeline
    from llmctl.schema import GenerateConfig
    from llmctl.stages.generate import generate

    tokenizer = load_tokenizer(str(tiny_lm))
    chosen = {"backend": "openvino", "method": "weight", "bits": 8, "group_size": -1,
              "sym": False}
    qmodel = quantization.quantize(load_causal_lm(str(tiny_lm)), str(tiny_lm), chosen)
    quantization.save(qmodel, chosen, tmp_path / "q", tokenizer)
    assert (tmp_path / "q" / "openvino_tokenizer.xml").exists()
    assert (tmp_path / "q" / "openvino_detokenizer.xml").exists()

    model = quantization.load_model(str(tmp_path / "q"))
    assert model.ov_config["INFERENCE_PRECISION_HINT"] == "f32"  # both decoders alike
    assert genai_pipeline(model) is not None and model.request is None
    text = "The function returns"
    for cfg in (GenerateConfig(max_new_tokens=10),
                GenerateConfig(max_new_tokens=10, num_beams=4, num_return_sequences=2)):
        completions, _ = generate(model, tokenizer, text, cfg)
        assert model.request is None  # decoded by openvino-genai, not optimum-intel
        ids = tokenizer(text, return_tensors="pt")
        reference = quantization.load_model(str(tmp_path / "q")).generate(
            **ids, generation_config=GenerationConfig(
                max_new_tokens=10, num_beams=cfg.num_beams, do_sample=False,
                num_return_sequences=cfg.num_return_sequences,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
        expected = tokenizer.batch_decode(reference[:, ids["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
        assert completions == expected and any(c.strip() for c in completions)
    # sampling: the stage's seed decides the draw, and top_k = 1 is greedy
    sample = GenerateConfig(max_new_tokens=10, do_sample=True, top_k=1)
    torch.manual_seed(0)
    assert generate(model, tokenizer, text, sample)[0] == generate(model, tokenizer, text,
                                                                   GenerateConfig(max_new_tokens=10))[0]
    wide = GenerateConfig(max_new_tokens=10, do_sample=True, top_k=0, temperature=5.0,
                          num_return_sequences=4)
    draws = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        draws.append(generate(model, tokenizer, text, wide)[0])
    assert draws[0] == draws[1] and draws[0] != draws[2]
    # a stop string ends the text where it first appears
    stop = completions[0].split()[1] if len(completions[0].split()) > 1 else None
    if stop:
        cut = generate(model, tokenizer, text, GenerateConfig(max_new_tokens=10, stop=[stop]))[0]
        assert all(stop not in c for c in cut)
    assert model.request is None


def test_nncf_is_quieted_after_its_import_and_keeps_its_logger(monkeypatch):
    """NNCF's bit-width tables are INFO on its own stdout handler: lowered to WARNING for a
    normal run, after NNCF made its logger (a plain "nncf" logger made earlier lacks the
    methods NNCF calls, such as warning_once)."""
    import logging

    from llmctl import env

    monkeypatch.setattr(env, "_quiet", True)
    env.quiet_nncf()
    from nncf.common.logging.logger import NNCFLogger, nncf_logger, set_log_level

    try:
        assert isinstance(logging.getLogger("nncf"), NNCFLogger)
        assert not nncf_logger.isEnabledFor(logging.INFO)
        assert all(h.level == logging.WARNING for h in nncf_logger.handlers)
    finally:
        set_log_level(logging.INFO)


def test_neural_compressor_does_not_announce_its_accelerator():
    """neural-compressor (imported by peft during ppo) logged "Auto detect accelerator" as
    WARNING on every run: its logger takes its level from LOGLEVEL, which the CLI now sets."""
    import subprocess
    import sys

    code = ("from llmctl.env import quiet_libraries; quiet_libraries()\n"
            "from neural_compressor.torch.utils.auto_accelerator import auto_detect_accelerator\n"
            "auto_detect_accelerator()")
    env = {k: v for k, v in os.environ.items() if k != "LOGLEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "Auto detect accelerator" not in done.stderr, done.stderr
