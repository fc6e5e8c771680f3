"""What every quantization backend is (:class:`QuantizeBackend`), and what several share:
calibration data, OpenVINO's telemetry off.

Nothing here imports torch or a backend's library at import time: ``llmctl --help`` and recipe
validation read the backends' tables and names, and must not pay for loading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from llmctl.schema import QuantizeCommon


class QuantizeBackend:
    """A ``quantize.backend``: its recipe table, and how it quantizes, saves and loads a model.

    A backend is one module under ``llmctl/quantization/`` with its table (a
    :class:`~llmctl.schema.QuantizeCommon` subclass naming its methods and fields) and one
    instance of its subclass of this, listed in ``llmctl.quantization.BACKENDS``.
    """

    name: ClassVar[str]  # the value of quantize.backend
    table: ClassVar[type["QuantizeCommon"]]  # its [quantize] table
    label: ClassVar[str]  # the library, as the quantize command's help names it
    calibrated: ClassVar[tuple[str, ...]] = ()  # methods that need calibration data
    # What generate, bench and serve run its output with, when not transformers' generate():
    # "openvino-genai" (its C++ decoding loop, continuous batching in serve), "llama.cpp".
    runtime: ClassVar[str | None] = None

    def check(self) -> None:
        """Exit 2 when this machine or install cannot run the backend."""

    def check_model(self, path: str, key: str) -> None:
        """Exit 2 when the backend cannot quantize this local model (its family)."""

    def ladder(self, cfg, base: dict[str, Any], model) -> list[dict[str, Any]]:
        """Settings to try, ``base`` (the recipe's) first, each next one gentler on accuracy."""
        return [base]

    def quantize(self, model, source_dir: str, settings: dict[str, Any],
                 calibration: "Calibration | None"):
        """A quantized copy of ``model`` (``source_dir`` holds it, for exporting backends)."""
        raise NotImplementedError

    def save(self, qmodel, out_dir: Path, tokenizer) -> None:
        """The weights, in a format :meth:`load` reads (safetensors or OpenVINO IR), and any
        form of the tokenizer the backend's own runtime needs (the transformers one is saved
        for every backend)."""
        raise NotImplementedError

    def load(self, path: Path, settings: dict[str, Any]):
        """The model :meth:`save` wrote, ready for ``generate`` and forward passes."""
        raise NotImplementedError

    def check_runtime(self, path: str, key: str) -> None:
        """Exit 2 when what runs this backend's output here is not installed (``key`` names
        where the output was asked for)."""

    def runtime_ready(self, path: Path) -> bool:
        """Whether :attr:`runtime` can run this saved model here (installed, files complete)."""
        return self.runtime is not None

    def generate(self, model, input_ids: "torch.Tensor", config) -> list[list[int]] | None:
        """New token ids of each returned sequence for one prompt, decoded by the backend's
        own runtime; None: the caller uses ``model.generate``."""
        return None

    def describe(self, settings: dict[str, Any]) -> str:
        """One trial's settings, as the quantize stage prints them."""
        parts = [settings["backend"], settings["method"], f"{settings['bits']}-bit"]
        if settings.get("fp32_modules"):
            parts.append(f"fp32: {', '.join(settings['fp32_modules'])}")
        return " ".join(parts)


@dataclass
class Calibration:
    """Token blocks (1-D ``input_ids``) of a data source that GPTQ, AWQ and static INT8 see."""

    blocks: list["torch.Tensor"]

    def feed(self, model: "torch.nn.Module") -> None:
        import torch

        with torch.no_grad():
            for ids in self.blocks:
                model(input_ids=ids.unsqueeze(0))

    @property
    def example_inputs(self) -> "torch.Tensor":
        return self.blocks[0].unsqueeze(0)


def decline_openvino_telemetry() -> None:
    """Switch off NNCF's and OpenVINO's usage telemetry for this process.

    Without a consent file in the home directory NNCF sends telemetry by default, from a
    process it forks in a background thread; in a test run that fork landed while Deep Lake
    worked in the main thread and the interpreter died with a segfault. llmctl declines for
    its own process, as a "0" in the consent file would, and leaves the user's file alone.
    """
    try:
        from openvino_telemetry import Telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED
    # Telemetry is a singleton; one made before this call keeps its consent otherwise.
    made = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
    if made is not None:
        made.consent = False
