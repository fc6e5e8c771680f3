"""llmctl's PPO: trl 1.12's ``PPOTrainer`` (the "v2" PPO of Huang et al.'s N+ implementation
details) in plain PyTorch, transformers and peft, with resume, a reward model that has its own
tokenizer, the adaptive KL controller and DDP.

trl removed PPO in 1.13; this file is that algorithm, kept the same: tests/test_ppo_trace.py
feeds it what trl 1.12 sampled (tests/data/ppo_trace, recorded by scripts/ppo_trace.py) and
checks every metric trl logged, step by step. One PPO step (a "batch"):

1. rollout: sample a response per query (temperature, no top-k/top-p), keep the sampling
   log-probs; the reference's log-probs (the policy with its LoRA adapter off), the value
   model's values; truncate each response after its first eos and score it with the reward;
2. rewards: a per-token KL penalty ``-kl_coef * kl`` (k1 or k3) plus the score at the token
   after the response's end; ``missing_eos_penalty`` off the score of a response without eos;
3. GAE (gamma 1, lambda 0.95, trl's defaults) over the response, returns = advantages + values,
   advantages whitened;
4. ``ppo_epochs`` passes over the batch in shuffled mini-batches (micro-batches of
   ``batch_size / grad_accum`` rollouts, an optimizer step every ``grad_accum`` of them): the
   clipped policy loss plus ``vf_coef`` times the clipped value loss; AdamW, and a learning
   rate that falls linearly to zero over the steps, once per PPO step.

Where it differs from trl, on purpose: the LM head runs only on the positions that predict a
response token (trl applies it to the query's positions too and throws those logits away: with
a 90-token prompt, a 3-token answer and a 49k vocabulary, most of a forward pass); the value
head likewise. The loss statistics are averaged over the micro-batches that ran (trl averages
a fixed-shape array in which, with ``1 < grad_accum`` and ``1 < mini_batches``, some cells stay
zero). Accumulated gradients step at every ``grad_accum``-th micro-batch, never also at the end
of a pass over the prompts, as accelerate did for trl. No dropout at all (trl zeroed
``nn.Dropout`` modules but left models that drop out by config, as OPT does, dropping out).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig

from llmctl import distributed
from llmctl.data import Template
from llmctl.errors import StageFailed
from llmctl.evaluation import reward_scores

INVALID_LOGPROB = 1.0  # trl's fill for padded positions: the two log-probs cancel in the KL
GAMMA, LAM = 1.0, 0.95  # trl's PPOConfig defaults (N+ implementation details)
CLIPRANGE_VALUE = 0.2


# -- rewards ---------------------------------------------------------------------------------

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


class TextReward:
    """A reward model that scores *text*: each rollout's ids without padding become text
    (:class:`RewardInput`), which the reward model reads with its own tokenizer. trl's PPO saw
    the same numbers through llmctl's adapter (the score at every position)."""

    def __init__(self, reward_model, reward_tokenizer, reward_input: RewardInput,
                 max_length: int, batch_size: int):
        self.model, self.tokenizer, self.reward_input = reward_model, reward_tokenizer, reward_input
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, query_responses: torch.Tensor, context_length: int,
                 pad_token_id: int) -> torch.Tensor:
        rows = [row[row != pad_token_id].tolist() for row in query_responses]
        return torch.tensor(self.score_ids(rows), device=query_responses.device)

    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of rollouts given as token ids without padding."""
        texts = [self.reward_input(ids) for ids in sequences]
        return reward_scores(self.model, self.tokenizer, texts, self.max_length, self.batch_size)


class SharedReward:
    """A reward model that reads the policy's token ids (same vocabulary): trl's ``get_reward``,
    its score at the response's last non-pad token."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def __call__(self, query_responses: torch.Tensor, context_length: int,
                 pad_token_id: int) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(**model_inputs(query_responses, pad_token_id),
                          use_cache=False).last_hidden_state
        last = first_true(query_responses[:, context_length:] == pad_token_id) - 1 + context_length
        rows = torch.arange(len(hidden), device=hidden.device)
        return self.model.score(hidden[rows, last]).squeeze(-1).float()


# -- the KL coefficient ------------------------------------------------------------------------

class KLController:
    """The KL coefficient: fixed, or with ``target`` Ziegler et al.'s adaptive controller, which
    after each PPO step moves it by ``clip(kl / target - 1, -0.2, 0.2) * batch / horizon``
    (batch: rollouts per step of one process, as llmctl passed it to trl's PPO)."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000,
                 batch_size: int = 1):
        self.coef, self.target, self.horizon, self.batch_size = coef, target, horizon, batch_size

    def update(self, kl: float) -> None:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * self.batch_size / self.horizon


# -- forward passes ----------------------------------------------------------------------------

def model_inputs(query_responses: torch.Tensor, pad_token_id: int) -> dict[str, torch.Tensor]:
    """trl's inputs: every pad token masked out of attention (left padding of the query and the
    padding after a response alike), positions counted over the tokens attended to."""
    mask = query_responses != pad_token_id
    return {"input_ids": query_responses.masked_fill(~mask, 0), "attention_mask": mask,
            "position_ids": mask.cumsum(1) - mask.long()}


def first_true(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row; the row's length where there is none."""
    length = bools.shape[-1]
    index = torch.arange(length, device=bools.device)
    return torch.where(bools, index, length).min(-1).values


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits) at ``tokens`` (trl's selective_log_softmax, fp32)."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


@contextmanager
def head_on_responses(model, context_length: int):
    """While inside, the LM head reads only the positions whose output predicts a response
    token (context_length - 1 to the last but one); the model's ``logits`` are those rows.
    The head is patched rather than called by hand so that whatever the model does after it
    (logit soft-capping, scaling) still happens."""
    head = model.get_output_embeddings()
    full, own = head.forward, head.__dict__.get("forward")
    head.forward = lambda hidden: full(hidden[:, context_length - 1:-1])
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def response_logits(policy, query_responses: torch.Tensor, pad_token_id: int,
                    context_length: int, temperature: float) -> torch.Tensor:
    """The policy's logits for each response token, at the sampling temperature (fp32)."""
    with head_on_responses(policy, context_length):
        logits = policy(**model_inputs(query_responses, pad_token_id), use_cache=False).logits
    return logits.float() / (temperature + 1e-7)


def response_values(value_model, query_responses: torch.Tensor, pad_token_id: int,
                    context_length: int) -> torch.Tensor:
    """The value model's value of each state a response token is sampled in (fp32): its score
    head on the backbone's last hidden states, as trl's ``get_reward``."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(**model_inputs(query_responses, pad_token_id),
                      use_cache=False).last_hidden_state
    return value_model.score(hidden[:, context_length - 1:-1]).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """The two trained models as one module, so one DDP wrapper all-reduces both gradients."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, query_responses, pad_token_id: int, context_length: int,
                temperature: float):
        return (response_logits(self.policy, query_responses, pad_token_id, context_length,
                                temperature),
                response_values(self.value_model, query_responses, pad_token_id,
                                context_length))


@torch.no_grad()
def sample(policy, queries: torch.Tensor, pad_token_id: int,
           generation_config: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Query + sampled response ids (the queries left-padded), and each response token's
    log-prob under the sampling distribution (the scores generate sampled from: the logits
    over the temperature). A sequence that ended pads on; generate stops when all have."""
    mask = queries != pad_token_id
    out = policy.generate(input_ids=queries.masked_fill(~mask, 0), attention_mask=mask,
                          generation_config=generation_config, return_dict_in_generate=True,
                          output_scores=True)
    responses = out.sequences[:, queries.shape[1]:]
    logprobs = torch.stack([token_logprobs(s, responses[:, t]) for t, s in enumerate(out.scores)],
                           1)
    return torch.cat((queries, responses), 1), logprobs


def truncate_after_stop(responses: torch.Tensor, stop_token_id: int,
                        pad_token_id: int) -> torch.Tensor:
    """Everything after the first stop token becomes padding."""
    stop = first_true(responses == stop_token_id).unsqueeze(-1)
    index = torch.arange(responses.shape[1], device=responses.device)
    return responses.masked_fill(index > stop, pad_token_id)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std over the masked entries, the variance unbiased (trl's)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if count < 2:
        raise StageFailed("ppo: one response token in a batch: too few to whiten advantages")
    var = var * count / (count - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


# -- the trainer -------------------------------------------------------------------------------

class PPOTrainer:
    """PPO of a LoRA ``policy`` (a peft model: the reference is its adapter switched off) with
    a ``value_model`` (trained whole) against ``reward`` (a :class:`TextReward` or
    :class:`SharedReward`), on the token ids of ``queries``.

    ``cfg`` is the recipe's [ppo] table (a PpoConfig). In several processes (torchrun) each
    process samples ``cfg.batch_size`` rollouts a step from its own share of the prompts and
    the gradients are all-reduced. ``sampler`` and ``permutation`` stand in for sampling and
    for the mini-batch shuffle (tests feed what trl sampled); everything else is the run's.
    """

    def __init__(self, cfg, policy, value_model, reward, tokenizer, queries: list[list[int]],
                 seed: int, precision: str = "fp32", sampler=None, permutation=None):
        self.cfg, self.policy, self.value_model, self.reward = cfg, policy, value_model, reward
        self.tokenizer, self.queries, self.seed = tokenizer, queries, seed
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.device = next(policy.parameters()).device
        if cfg.batch_size % cfg.grad_accum or cfg.batch_size % cfg.mini_batches:
            raise StageFailed(f"ppo.batch_size {cfg.batch_size} must be a multiple of "
                              f"ppo.grad_accum and of ppo.mini_batches")
        self.micro_batch = cfg.batch_size // cfg.grad_accum
        self.mini_batch = cfg.batch_size // cfg.mini_batches
        self.batches_per_pass = len(queries) // (cfg.batch_size * self.world)
        if self.batches_per_pass == 0:
            raise StageFailed(f"ppo: {len(queries)} prompts are fewer than one batch of "
                              f"{cfg.batch_size * self.world}")
        self.kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.batch_size)
        # No dropout anywhere (the policy, its adapter, the value and reward models): the
        # update must see the log-probs the rollout sampled with. trl meant the same but only
        # zeroed nn.Dropout modules and ran in train mode, so a model that drops out by
        # config.dropout (OPT, the demo's) kept dropping out; eval mode stops every kind.
        self.model = PolicyAndValue(policy, value_model).to(self.device).eval()
        for model in (policy, value_model, getattr(reward, "model", None)):
            if model is not None:
                model.eval()
                for module in model.modules():
                    if isinstance(module, nn.Dropout):
                        module.p = 0.0
        self.ddp = self.model
        if self.world > 1 and torch.distributed.is_initialized():
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type in ("cuda", "cpu") and all(p.is_floating_point() for p in params)
        # As the HF Trainer built it for trl: AdamW (fused), betas (0.9, 0.999), eps 1e-8, no
        # weight decay; the learning rate falls linearly from lr to 0 over the PPO steps.
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, (cfg.steps - step) / cfg.steps))
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if precision == "bf16" else
                         torch.autocast(self.device.type, dtype=torch.float16)
                         if precision == "fp16" else nullcontext())
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.generation_config = GenerationConfig(
            max_new_tokens=cfg.response_length, temperature=cfg.temperature + 1e-7, top_k=0,
            top_p=1.0, do_sample=True, eos_token_id=self.eos, pad_token_id=self.pad)
        self.sampler = sampler or (lambda queries: sample(self.policy, queries, self.pad,
                                                           self.generation_config))
        # The mini-batch shuffle has a generator of its own, saved with the checkpoints.
        self.shuffle = torch.Generator().manual_seed(seed + self.rank * 100003)
        self.permutation = permutation or (
            lambda n: torch.randperm(n, generator=self.shuffle).tolist())
        self.step, self.micro_steps, self.log_history = 0, 0, []

    # -- data --------------------------------------------------------------------------------

    def batch_queries(self, step: int) -> torch.Tensor:
        """This process's queries for PPO step ``step`` (0-based), left-padded. Each pass over
        the prompts is a fresh permutation from the seed; its batches go round the processes."""
        n, per_step = len(self.queries), self.cfg.batch_size * self.world
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            self.seed + step // self.batches_per_pass)).tolist()
        start = (step % self.batches_per_pass) * per_step + self.rank * self.cfg.batch_size
        rows = [self.queries[i] for i in order[start:start + self.cfg.batch_size]]
        width = max(map(len, rows))
        return torch.tensor([[self.pad] * (width - len(r)) + r for r in rows], device=self.device)

    # -- one PPO step ------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, queries: torch.Tensor) -> SimpleNamespace:
        """Sample, score and compute the advantages of one batch (steps 1 to 3 above)."""
        cfg, pad = self.cfg, self.pad
        context_length = queries.shape[1]
        query_responses, logprobs = self.sampler(queries)
        responses = query_responses[:, context_length:]
        with self.policy.disable_adapter():  # the reference policy
            ref_logprobs = token_logprobs(
                response_logits(self.policy, query_responses, pad, context_length,
                                cfg.temperature), responses)
        values = response_values(self.value_model, query_responses, pad, context_length)
        # The reward model reads the response cut after its first eos.
        truncated = truncate_after_stop(responses, self.eos, pad)
        scores = self.reward(torch.cat((queries, truncated), 1), context_length, pad).float()
        if cfg.missing_eos_penalty is not None:
            scores = torch.where((truncated == self.eos).any(-1), scores,
                                 scores - cfg.missing_eos_penalty)

        # The response's last token is the one before the first pad: with pad = eos, as in
        # the demo's tokenizer, that is the token before the eos. Log-probs past it are
        # INVALID_LOGPROB; values are kept one position further (the score sits there).
        lengths = first_true(truncated == pad) - 1
        index = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
        padding_mask = index > lengths.unsqueeze(1)
        padding_mask_p1 = index > (lengths + 1).unsqueeze(1)
        logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        values = values.masked_fill(padding_mask_p1, 0)

        # Per-token KL penalty (joschu.net/blog/kl-approx.html: k1 = -log r, k3 = r - 1 - log r
        # with r = p_ref / p) and the score at the token after the response's last.
        log_ratio = ref_logprobs - logprobs
        kl = -log_ratio if cfg.kl_estimator == "k1" else log_ratio.exp() - 1 - log_ratio
        non_score_reward = -self.kl.coef * kl
        rewards = non_score_reward.clone()
        rows = torch.arange(len(rewards), device=rewards.device)
        end = torch.where(lengths + 1 < rewards.shape[1], lengths + 1, lengths)
        rewards[rows, end] += scores

        # GAE over every position (past the end the rewards and values are zero).
        advantages_reversed, last = [], 0.0
        length = responses.shape[1]
        for t in reversed(range(length)):
            next_values = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + GAMMA * next_values - values[:, t]
            last = delta + GAMMA * LAM * last
            advantages_reversed.append(last)
        advantages = torch.stack(advantages_reversed[::-1], 1)
        returns = advantages + values
        advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0)
        return SimpleNamespace(
            query_responses=query_responses, context_length=context_length,
            responses=responses, logprobs=logprobs, values=values, returns=returns,
            advantages=advantages, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1,
            scores=scores, kl=kl, non_score_reward=non_score_reward)

    def micro_batch_loss(self, b: SimpleNamespace, inds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The clipped PPO losses of some rollouts of batch ``b`` under the current weights."""
        cfg = self.cfg
        with self.autocast:
            logits, vpred = self.ddp(b.query_responses[inds], self.pad, b.context_length,
                                     cfg.temperature)
        mask, mask_p1 = ~b.padding_mask[inds], ~b.padding_mask_p1[inds]
        new_logprobs = token_logprobs(logits, b.responses[inds]).masked_fill(~mask,
                                                                             INVALID_LOGPROB)
        # Value loss: the larger of the plain and the clipped squared error (clipped: within
        # CLIPRANGE_VALUE of the rollout's value).
        vpred = vpred.masked_fill(~mask_p1, 0)
        old_values, returns = b.values[inds], b.returns[inds]
        vpred_clipped = torch.clamp(vpred, old_values - CLIPRANGE_VALUE,
                                    old_values + CLIPRANGE_VALUE)
        vf_losses1, vf_losses2 = (vpred - returns) ** 2, (vpred_clipped - returns) ** 2
        vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask_p1)
        # Policy loss: the larger of -A r and -A clip(r, 1 - eps, 1 + eps).
        log_ratio = new_logprobs - b.logprobs[inds]
        ratio = log_ratio.exp()
        advantages = b.advantages[inds]
        pg_losses = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 1 - cfg.cliprange, 1 + cfg.cliprange)
        pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
        loss = pg_loss + cfg.vf_coef * vf_loss
        with torch.no_grad():
            probs = logits.softmax(-1)
            entropy = logits.logsumexp(-1) - (probs * logits).sum(-1)
            stats = {"policy/approxkl_avg": 0.5 * (log_ratio ** 2).mean(),
                     "policy/clipfrac_avg": masked_mean((pg_losses2 > pg_losses).float(), mask),
                     "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
                     "val/clipfrac_avg": masked_mean((vf_losses2 > vf_losses1).float(), mask_p1),
                     "policy/entropy_avg": entropy.mean(), "val/ratio": ratio.mean()}
        return loss, {k: v.detach() for k, v in stats.items()}

    def update(self, b: SimpleNamespace) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes over the batch in shuffled mini-batches (step 4 above)."""
        cfg, stats = self.cfg, []
        for _ in range(cfg.ppo_epochs):
            order = torch.as_tensor(self.permutation(cfg.batch_size), device=self.device)
            for start in range(0, cfg.batch_size, self.mini_batch):
                mini = order[start:start + self.mini_batch]
                for micro_start in range(0, self.mini_batch, self.micro_batch):
                    inds = mini[micro_start:micro_start + self.micro_batch]
                    self.micro_steps += 1
                    stepping = self.micro_steps % cfg.grad_accum == 0
                    sync = nullcontext() if stepping or self.ddp is self.model else \
                        self.ddp.no_sync()
                    with sync:
                        loss, s = self.micro_batch_loss(b, inds)
                        loss = loss / cfg.grad_accum
                        (self.scaler.scale(loss) if self.scaler else loss).backward()
                    if stepping:
                        if self.scaler:
                            self.scaler.step(self.optimizer)
                            self.scaler.update()
                        else:
                            self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    stats.append(s)
        return {k: torch.stack([s[k] for s in stats]) for k in stats[0]}

    def train_step(self) -> dict[str, float]:
        """One PPO step: rollout, updates, the logged metrics (averaged over the processes),
        the KL controller, the learning rate."""
        b = self.rollout(self.batch_queries(self.step))
        stats = self.update(b)
        local = {
            "objective/kl": b.kl.sum(1).mean(),
            # the sampled responses' negative log-likelihood (trl's "entropy"), padding left out
            "objective/entropy": (-b.logprobs * (~b.padding_mask).float()).sum(1).mean(),
            "objective/non_score_reward": b.non_score_reward.sum(1).mean(),
            "objective/scores": b.scores.mean(),
            **{k: v.mean() for k, v in stats.items()},
        }
        local["objective/rlhf_reward"] = local["objective/non_score_reward"] + b.scores.mean()
        ratio_var = stats["val/ratio"]
        names = list(local)
        values = torch.stack([local[k].float() for k in names])
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
            values /= self.world
        self.step += 1
        metrics = {k: float(v) for k, v in zip(names, values)}
        metrics["val/ratio_var"] = float(ratio_var.var()) if len(ratio_var) > 1 else 0.0
        metrics["val/num_eos_tokens"] = int((b.responses == self.eos).sum())
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["kl_coef"] = self.kl.coef
        metrics["episode"] = self.step * self.cfg.batch_size * self.world
        metrics["epoch"] = metrics["episode"] / len(self.queries)
        metrics["step"] = self.step
        self.kl.update(metrics["objective/kl"])
        self.scheduler.step()
        return metrics

    def train(self, checkpoint_dir: Path | None = None, resume: str | None = None,
              on_log=None, on_save=None, until: int | None = None) -> list[dict]:
        """Run the remaining PPO steps (all, or those after checkpoint ``resume``; ``until``:
        stop after that step), saving a checkpoint every ``save_steps`` under
        ``checkpoint_dir``. Returns the log history."""
        if resume:
            self.load_checkpoint(Path(resume))
        else:
            torch.manual_seed(self.seed + self.rank * 100003)  # trl's per-process seed
        while self.step < min(self.cfg.steps, until or self.cfg.steps):
            started = time.perf_counter()
            metrics = self.train_step()
            metrics["seconds"] = time.perf_counter() - started
            self.log_history.append(metrics)
            if on_log:
                on_log(metrics)
            if checkpoint_dir is not None and (self.step % self.cfg.save_steps == 0):
                self.save_checkpoint(Path(checkpoint_dir))
                if on_save:
                    on_save()
        return self.log_history

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint_dir: Path, keep: int = 2) -> Path:
        """checkpoint-<step>/: the adapter, the value model, optimizer, scheduler, KL
        coefficient, step and log, and each process's random state. ``trainer_state.json`` is
        written last: a checkpoint without it is incomplete (``StageRun.last_checkpoint``)."""
        ckpt = checkpoint_dir / f"checkpoint-{self.step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save({"cpu": torch.get_rng_state(), "shuffle": self.shuffle.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   ckpt / f"rng_state_{self.rank}.pth")
        distributed.barrier()
        if self.rank == 0:
            self.policy.save_pretrained(str(ckpt))
            save_file({k: v.detach().cpu().contiguous()
                       for k, v in self.value_model.state_dict().items()},
                      str(ckpt / "value_model.safetensors"))
            torch.save(self.optimizer.state_dict(), ckpt / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), ckpt / "scheduler.pt")
            if self.scaler:
                torch.save(self.scaler.state_dict(), ckpt / "scaler.pt")
            (ckpt / "ppo_state.json").write_text(json.dumps(
                {"step": self.step, "kl_coef": self.kl.coef, "micro_steps": self.micro_steps}))
            (ckpt / "trainer_state.json").write_text(json.dumps(
                {"global_step": self.step, "log_history": self.log_history}, indent=1))
            done = sorted((p for p in checkpoint_dir.glob("checkpoint-*")
                           if p.name.split("-")[-1].isdigit() and p != ckpt
                           and (p / "trainer_state.json").exists()),
                          key=lambda p: int(p.name.split("-")[-1]))
            for old in done[:max(0, len(done) - (keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return ckpt

    def load_checkpoint(self, ckpt: Path) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.policy, load_file(str(ckpt / "adapter_model.safetensors"),
                                                         device=str(self.device)))
        self.value_model.load_state_dict(load_file(str(ckpt / "value_model.safetensors"),
                                                   device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True,
                                                  map_location=self.device))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        if self.scaler and (ckpt / "scaler.pt").exists():
            self.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
        state = json.loads((ckpt / "ppo_state.json").read_text())
        self.step, self.kl.coef = state["step"], state["kl_coef"]
        self.micro_steps = state["micro_steps"]
        self.log_history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
        rng_file = ckpt / f"rng_state_{self.rank}.pth"
        if rng_file.exists():  # another process count: the seeds stay as they are
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["cpu"])
            self.shuffle.set_state(rng["shuffle"])
            random.setstate(rng["python"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
