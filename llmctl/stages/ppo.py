"""`llmctl ppo`: RLHF of the SFT policy against a reward model with trl's PPO (v2 design).

Setup: the policy (upstream merge/sft model) gets a LoRA adapter, the reference policy is the
same model with the adapter switched off, the value model is the policy's weights with a scalar
head, and the reward model comes from the reward stage. trl's PPOTrainer feeds the *policy's*
token ids to the reward model, which is only right when both share a tokenizer; for a reward
model with its own vocabulary (the course's OPT policy + DeBERTa reward) llmctl hands trl a
`TextReward` that turns the policy's query+response into text (decoded, or with
``ppo.reward_text`` a format string over the prompt row and the answer, such as
"{response}: {text}" for an encoder trained on "label: tweet") and re-tokenizes it for the
reward model. Then: score held-out prompts before -> train -> score after -> save the adapter
(and, with ``merge = true``, a merged standalone model). Checkpoints every ``save_steps``
batches let a killed run resume, which trl's own loop cannot (see ``resumable``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from types import SimpleNamespace

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, TrainerCallback, set_seed

from llmctl import distributed
from llmctl.data import ChatTemplate, Template, make_template, open_split
from llmctl.errors import StageFailed, UserError
from llmctl.evaluation import paired_sem, reward_scores
from llmctl.models import device, load_causal_lm, load_classifier, load_tokenizer, lora_config, \
    resolve_precision, save_model
from llmctl.progress import console, save_loss_curve, stage_header
from llmctl.recipe import DataSource, PpoConfig, Recipe
from llmctl.rundir import StageRun, require_input
from llmctl.training import DiscardSuperseded, show_progress


def run(recipe: Recipe, run_dir: Path) -> dict:
    from trl.experimental.ppo import PPOConfig, PPOTrainer  # trl <= 1.12 only (GUIDE §1)

    cfg: PpoConfig = recipe.stage_config("ppo")
    set_seed(recipe.run.seed)
    inputs = recipe.upstream_inputs("ppo")
    require_input(inputs["model"], "ppo.model")
    require_input(inputs["reward_model"], "ppo.reward_model")

    # -- models -----------------------------------------------------------------------------
    tokenizer = load_tokenizer(inputs["model"], recipe.model, padding_side="left")
    policy = load_causal_lm(inputs["model"], recipe.model)
    value_model = load_classifier(inputs["model"], recipe.model)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    reward_tokenizer = load_tokenizer(inputs["reward_model"], recipe.model)
    reward_model = load_classifier(inputs["reward_model"], recipe.model).eval()
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id

    # -- prompts ----------------------------------------------------------------------------
    source = recipe.data_source("ppo", cfg.data)
    template = make_template(source, tokenizer)
    fields = template.prompt_fields
    key = f"data.{cfg.data}"
    train_rows = open_split(source, fields, "train", key).rows()
    eval_rows = open_split(source, fields, "eval", key).rows()[:cfg.eval_prompts]
    train_ids = query_ids(train_rows, template, tokenizer, cfg.query_max_length)
    eval_ids = query_ids(eval_rows, template, tokenizer, cfg.query_max_length)
    use_distinct_pad(tokenizer, [*train_ids, *eval_ids], policy, value_model)
    train_ds = Dataset.from_dict({"input_ids": train_ids})

    reward_input = RewardInput(tokenizer, cfg.reward_text,
                               [*zip(train_ids, train_rows), *zip(eval_ids, eval_rows)])
    text_reward = TextReward(reward_model, reward_tokenizer, reward_input, cfg.reward_max_length,
                             cfg.reward_batch_size)
    shared = shares_tokenizer(tokenizer, reward_tokenizer) and hasattr(reward_model, "score") \
        and not cfg.reward_text
    trl_reward = reward_model if shared else text_reward
    stage_header("ppo", f"policy {inputs['model']}, reward {inputs['reward_model']} "
                        f"({'shared tokenizer' if shared else 'own tokenizer: re-tokenized text'})")

    rewards_before = sampled_rewards(policy, tokenizer, eval_ids, text_reward, cfg, recipe.run.seed)
    stage = StageRun.start(recipe, "ppo", inputs)
    precision = resolve_precision(cfg.precision)
    args = PPOConfig(
        output_dir=str(stage.checkpoint_dir), seed=recipe.run.seed, run_name=f"{recipe.run.name}-ppo",
        learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size // cfg.grad_accum,
        gradient_accumulation_steps=cfg.grad_accum, num_mini_batches=cfg.mini_batches,
        num_ppo_epochs=cfg.ppo_epochs,
        total_episodes=cfg.steps * cfg.batch_size * distributed.world_size(),  # batch_size per process
        response_length=cfg.response_length, temperature=cfg.temperature, kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator, cliprange=cfg.cliprange, vf_coef=cfg.vf_coef,
        missing_eos_penalty=cfg.missing_eos_penalty, stop_token="eos",
        local_rollout_forward_batch_size=cfg.batch_size, num_sample_generations=0,
        save_strategy="steps", save_steps=cfg.save_steps, logging_steps=cfg.logging_steps,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        report_to=[] if cfg.report_to == "none" else [cfg.report_to], disable_tqdm=True,
    )
    trainer = resumable(PPOTrainer)(
        args=args, processing_class=tokenizer, model=policy, ref_model=None,
        reward_model=trl_reward, value_model=value_model, train_dataset=train_ds,
        peft_config=lora_config(cfg.lora, policy, "ppo.lora"))
    show_progress(trainer, "ppo")
    if cfg.kl_target is not None:
        trainer.add_callback(AdaptiveKL(cfg.kl_target, cfg.kl_horizon, cfg.batch_size))

    # -- train ------------------------------------------------------------------------------
    checkpoint = stage.last_checkpoint()
    if checkpoint:
        console.print(f"  resuming from {checkpoint}")
    trainer.add_callback(DiscardSuperseded(stage))
    trainer.train_from(checkpoint)
    policy_model = trainer.accelerator.unwrap_model(trainer.model).policy
    rewards_after = sampled_rewards(policy_model, tokenizer, eval_ids, text_reward, cfg,
                                    recipe.run.seed)
    reward_before, reward_after = mean(rewards_before), mean(rewards_after)
    gain_sem = paired_sem(rewards_before, rewards_after)
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    kl_last = float(logs[-1]["objective/kl"])
    console.print(f"  held-out prompts: mean reward {reward_before:.3f} before -> "
                  f"{reward_after:.3f} after (gain {reward_after - reward_before:+.3f} "
                  f"± {gain_sem:.3f}); KL to the reference {kl_last:.3f}")
    if cfg.max_kl is not None and kl_last > cfg.max_kl:
        raise StageFailed(f"ppo: final KL {kl_last:.3f} exceeds ppo.max_kl {cfg.max_kl}; "
                          f"lower ppo.lr or raise ppo.kl_coef")

    # -- save -------------------------------------------------------------------------------
    outputs = {"adapter": "adapter", "loss_curve": "reward_curve.png",
               "log_history": "log_history.json"}
    if cfg.merge:
        outputs["model"] = "model"
    if stage.is_main_process:  # under several processes, rank 0 writes
        save_model(policy_model, tokenizer, stage.path("adapter"))
        if cfg.merge:
            save_model(policy_model.merge_and_unload(), tokenizer, stage.path("model"))
        save_loss_curve([{"step": h["step"], "loss": h["objective/scores"]} for h in logs],
                        stage.path("reward_curve.png"), "ppo: mean reward per batch")
        stage.path("log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    metrics = {
        "reward_mean_first": float(logs[0]["objective/scores"]),
        "reward_mean_last": float(logs[-1]["objective/scores"]),
        "kl_last": kl_last,
        "kl_coef_last": float(trainer.args.kl_coef),
        "reward_mean_before": reward_before,
        "reward_mean_after": reward_after,
        "reward_gain": reward_after - reward_before,
        "reward_gain_sem": gain_sem,
        "policy_loss_last": float(logs[-1]["loss/policy_avg"]),
        "value_loss_last": float(logs[-1]["loss/value_avg"]),
        "global_step": trainer.state.global_step,
        "world_size": distributed.world_size(),
        "effective_batch_size": cfg.batch_size * distributed.world_size(),
    }
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    stage.finish(metrics, outputs, extra={"reward_tokenizer_shared": shared})
    return metrics


def shares_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id


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


def query_ids(rows: list[dict], template: Template | ChatTemplate, tokenizer,
              max_length: int) -> list[list[int]]:
    """Each prompt row as the token ids PPO continues (the template's context, truncated)."""
    texts = [template.context(row) for row in rows]
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def check_reward_text(reward_text: str | None, source: DataSource) -> None:
    """ppo.reward_text may name the prompt rows' fields and {response}, nothing else (checked in
    preflight, before every run and dry run)."""
    if not reward_text:
        return
    if source.template == "chat":
        fields = ["messages"] if source.user is None else Template(source.user).fields
    else:
        fields = Template.get(source.template).prompt_fields
    unknown = [f for f in Template(reward_text).fields if f not in [*fields, "response"]]
    if unknown:
        raise UserError(f"ppo.reward_text: {{{unknown[0]}}} is not a field of the prompts "
                        f"(fields: {', '.join([*fields, 'response'])})")


def use_distinct_pad(tokenizer, queries: list[list[int]], *models) -> None:
    """A pad token that no query contains. trl's PPO masks every pad token out of attention,
    and chat models often pad with their end-of-turn token, which chat prompts are full of
    (SmolLM2 pads with <|im_end|>): the policy would be trained on prompts it cannot see."""
    used = {t for ids in queries for t in ids}
    if tokenizer.pad_token_id not in used:
        return
    special = {**dict(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens)),
               **{i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}}
    for token_id, token in sorted(special.items()):
        if token_id not in used and token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            for model in models:
                model.config.pad_token_id = token_id
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.pad_token_id = token_id
            return
    raise UserError(f"ppo: the pad token {tokenizer.pad_token!r} occurs in the prompts and the "
                    f"tokenizer has no other special token to pad with")


@torch.inference_mode()
def sampled_rewards(policy, tokenizer, prompts: list[list[int]], reward: TextReward,
                    cfg: PpoConfig, seed: int, samples: int = 4) -> list[float]:
    """Rewards of responses to held-out prompts (token ids), sampled as PPO samples them
    (temperature, no top-k/top-p), several per prompt, from a fixed seed: the quantity PPO
    maximises. The same seed before and after training pairs the draws, which makes the gain's
    error small."""
    policy.eval()
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    gen = GenerationConfig(max_new_tokens=cfg.response_length, do_sample=True, top_k=0, top_p=1.0,
                           temperature=cfg.temperature, num_return_sequences=samples,
                           pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    sequences = []
    for i in range(0, len(prompts), 8):
        batch = tokenizer.pad({"input_ids": prompts[i:i + 8]}, return_tensors="pt").to(device())
        out = policy.generate(**batch, generation_config=gen)
        sequences += [[t for t in row if t != pad] for row in out.tolist()]
    return reward.score_ids(sequences)
