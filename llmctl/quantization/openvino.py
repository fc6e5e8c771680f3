"""``backend = "openvino"``: optimum-intel exports the model to OpenVINO IR, then NNCF
compresses the weights (``weight``: INT8, or INT4 with a group size and a share of INT4 layers)
or quantizes weights and activations (``static``: INT8, activation ranges calibrated on data,
SmoothQuant first: the static INT8 and SmoothQuant neural-compressor 3.x offers only through
PT2E)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from llmctl.env import quiet_nncf
from llmctl.errors import UserError
from llmctl.paths import adapter_base, is_adapter_dir
from llmctl.quantization.common import QuantizeBackend, decline_openvino_telemetry
from llmctl.schema import QuantizeCommon

if TYPE_CHECKING:
    import torch


class OpenVinoQuantize(QuantizeCommon):
    """OpenVINO through optimum-intel/NNCF: weight-only INT4/INT8, or static INT8."""

    backend: Literal["openvino"] = Field(..., description="the quantization backend")
    method: Literal["weight", "static"] = Field(
        "weight", description="weight: weight-only compression; static: INT8 weights and "
        "activations, calibrated")
    bits: Literal[4, 8] = Field(4, description="weight bits (static: 8)")
    group_size: int = Field(128, ge=-1, description="INT4: weights per quantization group; -1: "
                            "one group per output channel")
    sym: bool = Field(True, description="symmetric quantization (no zero point)")
    smooth_quant: bool = Field(True, description="static: SmoothQuant before quantizing")
    smooth_quant_alpha: float = Field(0.95, ge=0, le=1, description="SmoothQuant's migration "
                                      "strength (0.95 is NNCF's default for transformers)")

    @model_validator(mode="after")
    def _static_is_int8(self) -> "OpenVinoQuantize":
        if self.method == "static" and self.bits != 8:
            raise ValueError("bits: openvino static quantization is INT8 (bits = 8)")
        return self


class OpenVino(QuantizeBackend):
    name, table, label = "openvino", OpenVinoQuantize, "OpenVINO"
    calibrated = ("static",)
    runtime = "openvino-genai"

    def check(self) -> None:
        decline_openvino_telemetry()
        try:
            import optimum.intel  # noqa: F401
        except ImportError:
            raise UserError("quantize.backend: \"openvino\" needs optimum-intel: "
                            "pip install 'llmctl[openvino]'") from None

    def check_model(self, path: str, key: str) -> None:
        """Exit 2 when optimum-intel cannot export this local model's family to OpenVINO IR for
        text generation: no export config for its ``model_type`` (optimum-intel 2.2: ministral3,
        mistral4), or one whose transformers version bounds exclude the installed transformers
        (2.2: qwen3_5_text up to 5.2, gemma4_text 5.5 and at most 5.0)."""
        if is_adapter_dir(path):
            path = adapter_base(path)
        config = Path(path) / "config.json"
        if not config.is_file():
            return  # a hub id or a .gguf file: the export itself says what it cannot do
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return  # check_loadable names a broken config
        if not model_type:
            return
        import importlib.metadata

        import optimum.exporters.openvino.model_configs  # noqa: F401  (registers the configs)
        import transformers
        from optimum.exporters.tasks import TasksManager
        from packaging.version import Version

        intel = f"optimum-intel {importlib.metadata.version('optimum-intel')}"
        try:
            export = TasksManager.get_exporter_config_constructor(
                exporter="openvino", model_type=model_type, task="text-generation-with-past",
                library_name="transformers")
        except (KeyError, ValueError):
            raise UserError(f"{key}: {path} is a {model_type} model, which {intel} cannot "
                            f"export to OpenVINO (no export config for text generation); use "
                            f"backend = \"torch\" or \"inc\"") from None
        export = getattr(export, "func", export)  # a partial over the config class
        low, high = (getattr(export, f"{b}_TRANSFORMERS_VERSION", None) for b in ("MIN", "MAX"))
        installed = Version(transformers.__version__)
        if (low and installed < Version(str(low))) or (high and installed > Version(str(high))):
            bounds = " and ".join(f"{op} {str(v).replace('.99', '.*')}" for op, v in
                                  ((">=", low), ("<=", high)) if v)
            raise UserError(f"{key}: {path} is a {model_type} model, which {intel} exports to "
                            f"OpenVINO only with transformers {bounds} (installed: "
                            f"{transformers.__version__}); use backend = \"torch\" or \"inc\"")

    def ladder(self, cfg, base: dict[str, Any], model) -> list[dict[str, Any]]:
        """INT4 on a shrinking share of layers (the rest INT8), then INT8 everywhere; static
        INT8 falls back to INT8 weights with fp activations, asymmetric (NNCF's default for
        8-bit weights: on the fp32 real run's PPO model it kept 0.600 of 0.593 held-out
        accuracy where symmetric kept 0.580)."""
        if cfg.method == "static":
            alpha = cfg.smooth_quant_alpha if cfg.smooth_quant else None  # None: no SmoothQuant
            return [{**base, "smooth_quant_alpha": alpha},
                    {**base, "method": "weight", "sym": False}]
        if cfg.bits == 4:
            return [{**base, "ratio": r} for r in (1.0, 0.8, 0.6)] + [{**base, "bits": 8}]
        return [base]

    def quantize(self, model, source_dir: str, settings: dict[str, Any], calibration):
        decline_openvino_telemetry()
        quiet_nncf()
        if settings["method"] == "static":
            return _static(source_dir, settings, calibration)
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

        int4 = settings["bits"] == 4
        weights = OVWeightQuantizationConfig(
            bits=settings["bits"], sym=settings["sym"],
            group_size=settings["group_size"] if int4 else None,
            ratio=settings.get("ratio", 1.0) if int4 else 1.0,
            # A layer whose width the group size does not divide gets the largest group that does.
            group_size_fallback="adjust" if int4 else None)
        return OVModelForCausalLM.from_pretrained(source_dir, export=True,
                                                  quantization_config=weights,
                                                  ov_config=dict(CPU_PROPERTIES))

    def save(self, qmodel, out_dir: Path, tokenizer) -> None:
        qmodel.save_pretrained(str(out_dir))  # IR: openvino_model.xml / .bin
        save_genai_tokenizer(tokenizer, out_dir)

    def load(self, path: Path, settings: dict[str, Any]):
        decline_openvino_telemetry()
        try:
            from optimum.intel import OVModelForCausalLM
        except ImportError:
            raise UserError(f"{path}: an OpenVINO model needs optimum-intel: "
                            f"pip install 'llmctl[openvino]'") from None
        # Compiled on first use: generate and bench decode through openvino-genai's pipeline
        # when the directory has one, and only forward passes (perplexity, lm-eval) need this.
        model = OVModelForCausalLM.from_pretrained(str(path), compile=False,
                                                   ov_config=dict(CPU_PROPERTIES))
        model.llmctl_dir = Path(path)  # what genai_pipeline opens
        return model

    def runtime_ready(self, path: Path) -> bool:
        return has_genai_files(path)

    def generate(self, model, input_ids: "torch.Tensor", config) -> list[list[int]] | None:
        return genai_generate(model, input_ids, config)

    def describe(self, settings: dict[str, Any]) -> str:
        parts = [super().describe(settings)]
        if settings["bits"] == 4:
            parts.append(f"group {settings['group_size']}")
        if "ratio" in settings:
            parts.append(f"ratio {settings['ratio']}")
        if settings["method"] == "static":
            alpha = settings.get("smooth_quant_alpha")
            parts.append("no SmoothQuant" if alpha is None else f"SmoothQuant alpha {alpha}")
        return " ".join(parts)


BACKEND = OpenVino()


# f32 arithmetic around the compressed weights, where OpenVINO's CPU default is bf16 on a CPU
# with AMX: batch-1 decoding is bound by reading weights, and unpacking INT8/INT4 into bf16
# cost more than it saved. Measured on the 2-core AMX Xeon, openvino-genai, 128 greedy tokens:
# OPT-1.3B shape INT8 weights 1.31x, INT4 g128 1.10x; the real run's SmolLM2 INT8 65 -> 115
# tok/s, while a 512-token prompt's first token took 0.25 s instead of 0.13. Elsewhere f32 is
# the default already. optimum-intel's models get the same (quantize's trials included), so
# every number is measured as the model runs.
CPU_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32"}

# openvino-genai's LLMPipeline opens a directory holding the model IR and the tokenizer as
# openvino-tokenizers IR, and decodes in C++ (no Python per token).
GENAI_TOKENIZER, GENAI_DETOKENIZER = "openvino_tokenizer.xml", "openvino_detokenizer.xml"


def save_genai_tokenizer(tokenizer, out_dir: Path) -> bool:
    """The tokenizer and detokenizer as OpenVINO IR beside the model (with its chat template),
    so that ``openvino_genai.LLMPipeline(out_dir, "CPU")`` opens the directory as it is. False
    when openvino-tokenizers is not installed or cannot convert this tokenizer: the directory
    still loads through optimum-intel."""
    try:
        import openvino
        from openvino_tokenizers import convert_tokenizer
    except ImportError:
        return False
    try:
        ov_tokenizer, ov_detokenizer = convert_tokenizer(tokenizer, with_detokenizer=True)
    except Exception as err:  # openvino-tokenizers raises several types for unsupported ones
        print(f"note: openvino-genai cannot use this tokenizer ({type(err).__name__}: {err}); "
              "generation goes through optimum-intel", file=sys.stderr)
        return False
    openvino.save_model(ov_tokenizer, str(out_dir / GENAI_TOKENIZER))
    openvino.save_model(ov_detokenizer, str(out_dir / GENAI_DETOKENIZER))
    return True


def has_genai_files(path: str | Path) -> bool:
    """Whether openvino-genai can open this directory as it is: an OpenVINO model saved by
    llmctl with its tokenizer and detokenizer as IR, and openvino-genai installed."""
    path = Path(path)
    if not all((path / name).is_file() for name in ("openvino_model.xml", GENAI_TOKENIZER,
                                                       GENAI_DETOKENIZER)):
        return False
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        return False
    return True


def genai_pipeline(model):
    """openvino-genai's ``LLMPipeline`` over the directory an OpenVINO model was loaded from
    by :meth:`OpenVino.load`, made once per model; None for any other model (an export's own
    temporary directory holds the IR from before compression), or without openvino-genai."""
    directory = vars(model).get("llmctl_dir")
    if directory is None:
        return None
    if "_llmctl_genai" not in vars(model):
        try:
            import openvino_genai
        except ImportError:
            model._llmctl_genai = None
        else:
            model._llmctl_genai = openvino_genai.LLMPipeline(str(directory), "CPU",
                                                             **CPU_PROPERTIES)
    return model._llmctl_genai


def genai_generate(model, input_ids: torch.Tensor, config) -> list[list[int]] | None:
    """New token ids for each returned sequence of one prompt (``input_ids``: 1 x length),
    decoded by openvino-genai with a transformers ``GenerationConfig``'s settings. None when
    ``model`` is not an OpenVINO model with a pipeline, or a setting has no openvino-genai
    equivalent here: the caller then uses ``model.generate``."""
    import torch

    pipeline = genai_pipeline(model)
    if pipeline is None or input_ids.shape[0] != 1:
        return None
    import openvino
    import openvino_genai

    forced = config.min_new_tokens == config.max_new_tokens  # a fixed length, as bench times
    if config.min_new_tokens and not forced:
        return None  # min_new_tokens: openvino-genai's continuous-batching pipeline only
    if config.stop_strings and not (model.llmctl_dir / GENAI_DETOKENIZER).exists():
        return None  # stop strings are matched on text: the pipeline needs the detokenizer
    gen = pipeline.get_generation_config()
    gen.max_new_tokens = config.max_new_tokens
    gen.ignore_eos = forced
    gen.do_sample = bool(config.do_sample)
    # transformers 5 leaves a setting None unless it was given: then openvino-genai's own
    # default stays (the same values: one beam and sequence, no penalties, top-k off)
    settings = {"num_beams": config.num_beams,
                "num_return_sequences": config.num_return_sequences,
                "repetition_penalty": config.repetition_penalty,
                "length_penalty": config.length_penalty,
                "no_repeat_ngram_size": config.no_repeat_ngram_size or None,
                "eos_token_id": config.eos_token_id}
    if config.do_sample:
        settings.update(temperature=config.temperature, top_p=config.top_p,
                        top_k=config.top_k or None)  # transformers: 0 = off
        gen.rng_seed = torch.initial_seed() % 2**32  # the stage's seed, as torch sampling has
    for name, value in settings.items():
        if value is not None:
            setattr(gen, name, value)
    if config.stop_strings:
        gen.stop_strings = set(config.stop_strings)
    ids = input_ids.cpu().numpy()
    inputs = openvino_genai.TokenizedInputs(openvino.Tensor(ids), openvino.Tensor(ids * 0 + 1))
    return [list(tokens) for tokens in pipeline.generate(inputs, gen).tokens]


def _static(source_dir: str, settings: dict[str, Any], calibration):
    """Export fp, then NNCF's post-training quantization in place: SmoothQuant (unless the
    alpha is None), activation ranges from the calibration blocks, INT8 weights and activations."""
    import nncf
    import torch
    from optimum.intel import OVConfig, OVModelForCausalLM, OVQuantizationConfig, OVQuantizer

    ov_model = OVModelForCausalLM.from_pretrained(source_dir, export=True, load_in_8bit=False,
                                                  ov_config=dict(CPU_PROPERTIES))
    data = nncf.Dataset(calibration.blocks, lambda ids: ov_model.prepare_inputs(
        input_ids=ids.unsqueeze(0), attention_mask=torch.ones(1, len(ids), dtype=torch.long)))
    alpha = settings.get("smooth_quant_alpha")
    config = OVQuantizationConfig(bits=8, sym=settings["sym"], num_samples=len(calibration.blocks),
                                  smooth_quant_alpha=-1 if alpha is None else alpha)
    OVQuantizer(ov_model).quantize(calibration_dataset=data,
                                   ov_config=OVConfig(quantization_config=config))
    return ov_model
