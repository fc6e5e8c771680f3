"""trl's PPO, adapted: a reward model with its own tokenizer, resume after a kill, adaptive KL.

``TextReward`` stands in for the reward model trl calls with the policy's token ids and scores
the *text* with the reward model's own tokenizer; ``resumable`` gives trl's PPO loop (which has
no resume) checkpoints it can continue from; ``AdaptiveKL`` steers the KL coefficient towards a
target (Ziegler et al.).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from llmctl.data import Template
from llmctl.errors import StageFailed
from llmctl.evaluation import reward_scores


class RewardInput:
    """The text a reward model reads for a rollout, from its token ids (padding removed).

    By default the decoded query and response. With ``reward_text`` (a format string over the
    prompt row's fields and ``{response}``, the policy's answer alone) the reward model reads
    what it was trained on, e.g. ``"{response}: {text}"``; the row is found by the query's
    token ids, which every rollout starts with.
    """

    def __init__(self, tokenizer, reward_text: str | None, queries: list[tuple[list[int], dict]]):
        self.tokenizer = tokenizer
        self.format = Template(reward_text) if reward_text else None
        self.rows = {tuple(ids): row for ids, row in queries}
        self.lengths = sorted({len(ids) for ids, _ in queries})

    def __call__(self, ids: list[int]) -> str:
        if self.format is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        for n in self.lengths:
            row = self.rows.get(tuple(ids[:n]))
            if row is not None:
                response = self.tokenizer.decode(ids[n:], skip_special_tokens=True).strip()
                return self.format.render({**row, "response": response})
        raise StageFailed("ppo.reward_text: a rollout starts with no known query")


class TextReward(nn.Module):
    """A reward model behind trl's PPO interface that scores *text*, not the policy's token ids.

    trl calls ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=...)`` and
    then ``model.score(hidden_states[-1])``, reading the value at each sequence's last token.
    Here the "backbone" turns every row into text (:class:`RewardInput`), scores it with the
    reward model and its own tokenizer, and returns that score at every position; ``score`` is
    the identity. The reward trl sees is exactly the reward model's score of that text.
    """

    base_model_prefix = "backbone"

    def __init__(self, reward_model, reward_tokenizer, reward_input: RewardInput,
                 max_length: int, batch_size: int):
        super().__init__()
        self.backbone = _ScoreText(reward_model, reward_tokenizer, reward_input, max_length,
                                   batch_size)
        self.score = nn.Identity()

    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of rollouts given as token ids without padding."""
        return self.backbone.score_texts([self.backbone.reward_input(ids) for ids in sequences])


class _ScoreText(nn.Module):
    def __init__(self, reward_model, reward_tokenizer, reward_input, max_length, batch_size):
        super().__init__()
        self.reward_model, self.reward_tokenizer = reward_model, reward_tokenizer
        self.reward_input = reward_input
        self.max_length, self.batch_size = max_length, batch_size

    def score_texts(self, texts: list[str]) -> list[float]:
        return reward_scores(self.reward_model, self.reward_tokenizer, texts, self.max_length,
                             self.batch_size)

    def forward(self, input_ids, attention_mask, **unused):
        texts = [self.reward_input(ids[mask.bool()].tolist())
                 for ids, mask in zip(input_ids, attention_mask)]
        scores = torch.tensor(self.score_texts(texts), device=input_ids.device)
        hidden = scores[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=(hidden,))


def resumable(trainer_cls):
    """trl's PPOTrainer plus resume, which trl's PPO loop lacks.

    A checkpoint (every ``save_steps`` batches) holds what the Trainer saves (the policy's
    adapter, optimizer, scheduler, RNG, log history) plus the value model and the adaptive KL
    coefficient. ``train_from(checkpoint)`` restores all of it, skips the prompt batches already
    used, and runs the remaining updates, so a resumed run sees the same data, learning rate
    and step count as an uninterrupted one.
    """

    class ResumablePPOTrainer(trainer_cls):
        # A resumed loop counts from zero: checkpoints carry the whole run's step and history.
        _done, _history = 0, []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not hasattr(self.model, "policy"):
                # Under DDP self.model is the wrapper, and trl 1.12 reads self.model.policy in
                # its loop (the reference forward pass with the adapter off): expose the policy
                # without registering it as a second submodule.
                object.__setattr__(self.model, "policy",
                                   self.accelerator.unwrap_model(self.model).policy)

        def create_model_card(self, *args, **kwargs):
            pass  # a hub README in every checkpoint; it also reads self.model.config (not under DDP)

        def _save_checkpoint(self, model, trial):
            current = self.state.log_history
            self.state.global_step += self._done
            self.state.log_history = self._history + [
                {**h, "step": h.get("step", 0) + self._done} for h in current]
            try:  # ours first: the Trainer's trainer_state.json is what marks a checkpoint usable
                self._save_ppo_state()
                super()._save_checkpoint(model, trial)
            finally:
                self.state.global_step -= self._done
                self.state.log_history = current

        def _save_ppo_state(self):
            ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if self.is_world_process_zero():
                ckpt.mkdir(parents=True, exist_ok=True)
                value_model = self.accelerator.unwrap_model(self.model).value_model
                save_file({k: v.detach().cpu().contiguous()
                           for k, v in value_model.state_dict().items()},
                          str(ckpt / "value_model.safetensors"))
                (ckpt / "ppo_state.json").write_text(json.dumps(
                    {"kl_coef": self.args.kl_coef, "updates": self.state.global_step,
                     "episode": self.state.episode}))

        def train_from(self, checkpoint: str | None):
            if not checkpoint:
                return self.train()
            from peft import set_peft_model_state_dict

            ckpt = Path(checkpoint)
            state = json.loads((ckpt / "ppo_state.json").read_text())
            done = state["updates"]
            wrapper = self.accelerator.unwrap_model(self.model)
            set_peft_model_state_dict(wrapper.policy, load_file(str(ckpt / "adapter_model.safetensors")))
            wrapper.value_model.load_state_dict(load_file(str(ckpt / "value_model.safetensors")))
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
            self._load_rng_state(str(ckpt))
            self.args.kl_coef = state["kl_coef"]
            self._done = done
            self._history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
            self.dataloader = _SkipFirst(self.dataloader, done)
            total = self.args.num_total_batches
            self.args.num_total_batches = total - done
            try:
                output = self.train()
            finally:
                self.args.num_total_batches = total
            self.state.log_history = self._history + [
                {**h, "step": h.get("step", 0) + done} for h in self.state.log_history]
            self.state.global_step += done
            return output

    return ResumablePPOTrainer


class _SkipFirst:
    """A dataloader whose first pass starts ``n`` batches in (later passes are whole)."""

    def __init__(self, dataloader, n: int):
        self.dataloader, self.n = dataloader, n

    def __iter__(self):
        it = iter(self.dataloader)
        for _ in range(self.n % max(len(self.dataloader), 1)):
            next(it)
        self.n = 0
        return it

    def __len__(self):
        return len(self.dataloader)


class AdaptiveKL(TrainerCallback):
    """Ziegler et al.'s adaptive KL controller: steer kl_coef so the KL tracks a target."""

    def __init__(self, target: float, horizon: int, batch_size: int):
        self.target, self.horizon, self.batch_size = target, horizon, batch_size

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "objective/kl" in logs:
            error = max(-0.2, min(0.2, logs["objective/kl"] / self.target - 1))
            args.kl_coef *= 1 + error * self.batch_size / self.horizon
