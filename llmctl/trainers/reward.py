"""trl's RewardTrainer, adapted to encoder reward models (BERT, DeBERTa)."""

from __future__ import annotations

from trl import RewardTrainer

from llmctl.evaluation import accepts_argument


class _WithoutUseCache(dict):
    """A batch that ignores ``use_cache``, which encoder models' forward() does not accept."""

    def __setitem__(self, key, value):
        if key != "use_cache":
            super().__setitem__(key, value)


class EncoderFriendlyRewardTrainer(RewardTrainer):
    """trl's RewardTrainer sets ``use_cache=False`` on every batch, which BERT and DeBERTa reject;
    for them the flag is dropped (they have no cache to disable)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        self.drop_use_cache = not accepts_argument(base, "use_cache")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.drop_use_cache:
            inputs = _WithoutUseCache(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
