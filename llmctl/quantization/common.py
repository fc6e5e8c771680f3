"""What several quantization backends share: calibration data, and OpenVINO's telemetry off."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Calibration:
    """Token blocks (1-D ``input_ids``) of a data source that GPTQ, AWQ and static INT8 see."""

    blocks: list[torch.Tensor]

    def feed(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in self.blocks:
                model(input_ids=ids.unsqueeze(0))

    @property
    def example_inputs(self) -> torch.Tensor:
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
