"""`llmctl reward`, `ppo`, `dpo`, `grpo` and `rloo` on tiny models: reward accuracy above chance, PPO
with a same-tokenizer and a different-tokenizer reward model (rewards equal the reward model's
score of the decoded text), DPO, GRPO and RLOO with a reward model and a verifiable reward, and the
errors."""

import json

import pytest
import torch

from tests.conftest import kill_when, manifest, recipe_head, run_cli, run_llmctl

TINY_BERT = ("{ num_hidden_layers = 2, hidden_size = 64, num_attention_heads = 4, "
             "intermediate_size = 128, max_position_embeddings = 256 }")


def rlhf_recipe(tmp_path, assets, policy, extra=""):
    path = tmp_path / "rlhf.toml"
    # grpo's and rloo's tables (the same fields): the run's reward model and a length band
    group_rl = f"""data = "prompts"
model = "{policy}"
max_steps = 2
batch_size = 8
num_generations = 4
max_completion_length = 8
eval_prompts = 8
lr = 1e-3
save_steps = 100
rewards = [{{ kind = "model", text = "{{input}} {{response}}" }},
           {{ kind = "length", min_tokens = 2, max_tokens = 6, weight = 0.5 }}]
"""
    head = recipe_head(
        tmp_path / "run", "rlhf",
        prefs={"path": assets["prefs_train"], "eval_path": assets["prefs_eval"], "limit": 200},
        prompts={"path": assets["prompts_train"], "eval_path": assets["prompts_eval"],
                 "template": "alpaca_prompt", "limit": 64})
    path.write_text(head + f"""

[reward]
data = "prefs"
init = "config"
architecture = "bert"
tokenizer = "{assets['reward_tokenizer']}"
config = {TINY_BERT}
max_length = 96
batch_size = 16
epochs = 2
lr = 2e-3
logging_steps = 5
save_steps = 100

[ppo]
data = "prompts"
model = "{policy}"
steps = 2
batch_size = 4
mini_batches = 2
ppo_epochs = 1
lr = 1e-3
response_length = 8
eval_prompts = 4
kl_target = 0.1
merge = true

[dpo]
data = "prefs"
model = "{policy}"
max_steps = 6
batch_size = 4
lr = 1e-3
logging_steps = 2
max_length = 96
eval_max_batches = 10

[grpo]
{group_rl}
[rloo]
{group_rl}
{extra}
""")
    return path


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, assets, pretrained_model):
    from llmctl.pipeline import run_stage
    from llmctl.recipe import load_recipe

    root = tmp_path_factory.mktemp("rlhf")
    recipe = rlhf_recipe(root, assets, pretrained_model)
    run_stage(load_recipe(recipe), "reward")
    return recipe


def test_reward_model_beats_chance(reward_run):
    m = manifest(reward_run.parent / "run" / "reward")
    assert m["metrics"]["eval_accuracy"] > 0.7, m["metrics"]
    assert m["metrics"]["eval_reward_margin"] > 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = reward_run.parent / "run" / "reward" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert model.config.model_type == "bert" and model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # transformers 5: every class is fast
    assert type(tokenizer).__name__ in ("BertTokenizer", "BertTokenizerFast") and tokenizer.is_fast


def test_decoder_reward_model_from_policy(tmp_path, assets, pretrained_model, capsys):
    """The InstructGPT way: the reward model starts from the (SFT) policy's own weights."""
    recipe = rlhf_recipe(tmp_path, assets, pretrained_model)
    code, _, err = run_cli(["reward", recipe, "--set", "reward.init=\"pretrained\"",
                            "--set", f"reward.model=\"{pretrained_model}\"",
                            "--set", "reward.method=\"lora\"", "--set", "reward.epochs=1"], capsys)
    assert code == 0, err
    m = manifest(tmp_path / "run" / "reward")
    from transformers import AutoModelForSequenceClassification

    from llmctl.data import preference_split
    from llmctl.evaluation import preference_accuracy
    from llmctl.models import load_tokenizer
    from llmctl.recipe import load_recipe
    from llmctl.stages.reward import EVAL_PAIRS

    model_dir = tmp_path / "run" / "reward" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.model_type == "opt"
    # The manifest's accuracy is the saved model's, on the held-out pairs (not a training-time
    # number, nor a constant): rescoring them from disk gives the same figures.
    source = load_recipe(recipe).data_source("reward", "prefs")
    rows = preference_split(source, "eval", "data.prefs").rows()[:EVAL_PAIRS]
    accuracy, margin = preference_accuracy(model, load_tokenizer(str(model_dir)), rows, 96)
    assert m["metrics"]["eval_pairs"] == len(rows) > 0
    assert m["metrics"]["eval_accuracy"] == pytest.approx(accuracy, abs=1 / len(rows))
    assert m["metrics"]["eval_reward_margin"] == pytest.approx(margin, rel=1e-3, abs=1e-4)


def test_text_reward_equals_reward_model_on_decoded_text(reward_run, pretrained_model):
    """What PPO gets from llmctl's TextReward is the reward model's score of the text."""
    from llmctl.evaluation import reward_scores
    from llmctl.models import load_classifier, load_tokenizer
    from llmctl.trainers.ppo import RewardInput, TextReward

    reward_dir = str(reward_run.parent / "run" / "reward" / "model")
    policy_tok = load_tokenizer(str(pretrained_model), padding_side="left")
    reward_tok = load_tokenizer(reward_dir)
    reward_model = load_classifier(reward_dir).eval()
    reward = TextReward(reward_model, reward_tok, RewardInput(policy_tok, None, []), 96, 4)
    queries = ["Question: What is 7 plus 5?\n\nAnswer:", "Question: Spell cat backwards.\n\nAnswer:"]
    responses = [" 12.", " I don't care."]
    q = policy_tok(queries, return_tensors="pt", padding=True)["input_ids"]
    r = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(policy_tok(x)["input_ids"]) for x in responses], batch_first=True,
        padding_value=policy_tok.pad_token_id)
    used = reward(torch.cat([q, r], 1), q.shape[1], policy_tok.pad_token_id)
    direct = reward_scores(reward_model, reward_tok, [a + b for a, b in zip(queries, responses)], 96)
    assert used.tolist() == pytest.approx(direct, abs=1e-5)
    assert abs(direct[0] - direct[1]) > 1e-4  # the texts really are scored differently


def test_ppo_with_a_different_tokenizer(reward_run, capsys):
    code, _, err = run_cli(["ppo", reward_run], capsys)
    assert code == 0, err
    m = manifest(reward_run.parent / "run" / "ppo")
    assert m["reward_tokenizer_shared"] is False
    for key in ("reward_mean_first", "reward_mean_last", "kl_last", "reward_mean_before",
                "reward_mean_after"):
        assert isinstance(m["metrics"][key], float)
    metrics = m["metrics"]
    assert metrics["reward_gain"] == pytest.approx(metrics["reward_mean_after"]
                                                   - metrics["reward_mean_before"])
    assert 0 <= metrics["reward_gain_sem"] < 10  # 0 when two steps leave every draw as it was
    ppo_dir = reward_run.parent / "run" / "ppo"
    assert (ppo_dir / "adapter" / "adapter_config.json").exists()
    assert (ppo_dir / "model" / "model.safetensors").exists()
    # generate consumes the policy: the merged model is the recipe's last model
    code, out, err = run_cli(["generate", reward_run, "-p", "Question: What is 2 plus 2?", "--json"],
                             capsys)
    assert code == 0, err
    assert manifest(reward_run.parent / "run" / "generate")["inputs"]["model"] == "$RUN/ppo/model"


def test_ppo_with_the_policy_tokenizer(reward_run, tmp_path, capsys, pretrained_model):
    """A decoder reward model sharing the policy's vocabulary reads the policy's ids."""
    from llmctl.models import load_classifier, load_tokenizer, save_model

    reward_dir = tmp_path / "decoder_reward"
    model = load_classifier(str(pretrained_model))
    model.config.pad_token_id = 0
    save_model(model, load_tokenizer(str(pretrained_model)), reward_dir)
    code, _, err = run_cli(["ppo", reward_run, "--run-dir", tmp_path / "run",
                            "--set", f"ppo.reward_model=\"{reward_dir}\""], capsys)
    assert code == 0, err
    assert manifest(tmp_path / "run" / "ppo")["reward_tokenizer_shared"] is True


def test_held_out_samples_share_the_prompt_pass():
    """PPO's held-out sampling runs each prompt once and continues every sample from a copy of
    its KV cache: greedy rows equal generating each prompt alone (left padding and positions
    right), and sampled rows equal generate(num_return_sequences=n) from the same seed."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from llmctl.stages.ppo import generate_samples

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, pad_token_id=0,
                                         initializer_range=0.5)).eval()  # not near-uniform
    prompts = [[5, 9, 14, 3, 22, 7], [11, 4, 30]]
    ids = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])  # left-padded
    mask = (ids != 0).long()
    greedy = GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        out = generate_samples(model, ids, mask, greedy, samples=3)
        assert out.shape == (6, 10)
        for row, prompt in enumerate(prompts):
            alone = model.generate(torch.tensor([prompt]), generation_config=greedy)[0, -4:]
            for sample in range(3):
                assert out[3 * row + sample, -4:].tolist() == alone.tolist()
        sampled = GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=0,
                                   top_p=1.0, temperature=1.0, pad_token_id=0)
        torch.manual_seed(1)
        shared = generate_samples(model, ids, mask, sampled, samples=3)
        torch.manual_seed(1)
        plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=sampled,
                               num_return_sequences=3)
    assert torch.equal(shared, plain)
    assert len({tuple(r) for r in shared[:3, -4:].tolist()}) > 1  # the samples differ
    one_token = torch.tensor([[7], [30]])  # no prompt pass to share: generate's own path
    torch.manual_seed(2)
    with torch.inference_mode():
        alone = generate_samples(model, one_token, torch.ones_like(one_token), sampled, samples=3)
        torch.manual_seed(2)
        plain = model.generate(input_ids=one_token, attention_mask=torch.ones_like(one_token),
                               generation_config=sampled, num_return_sequences=3)
    assert alone.shape == (6, 5) and torch.equal(alone, plain)


def test_dpo_runs(reward_run, capsys):
    code, _, err = run_cli(["dpo", reward_run], capsys)
    assert code == 0, err
    m = manifest(reward_run.parent / "run" / "dpo")["metrics"]
    # the implicit reward ranks most held-out pairs right after a few steps (ties before)
    assert m["eval_rewards_accuracy"] > 0.6
    assert m["eval_pairs"] == 10 * 4  # eval_max_batches x batch_size: the split has more


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_grpo_with_a_reward_model_and_a_length_band(reward_run, capsys, stage):
    """GRPO (and RLOO, the same workflow) on the tiny policy: the run's reward model (its own
    tokenizer, reading the prompt row's input and the answer) and a verifiable length reward,
    weighted."""
    code, _, err = run_cli([stage, reward_run], capsys)
    assert code == 0, err
    grpo_dir = reward_run.parent / "run" / stage
    m = manifest(grpo_dir)
    assert m["inputs"] == {"model": m["inputs"]["model"], "reward_model": "$RUN/reward/model"}
    metrics = m["metrics"]
    assert metrics["global_step"] == 2
    assert metrics["eval_reward_gain"] == pytest.approx(metrics["eval_reward_after"]
                                                        - metrics["eval_reward_before"])
    assert metrics["eval_reward_gain_sem"] >= 0
    log = json.loads((grpo_dir / "log_history.json").read_text())
    # trl logged both rewards, and their weighted sum is the reward it trained on
    step = next(h for h in log if "rewards/reward_model/mean" in h)
    assert step["reward"] == pytest.approx(step["rewards/reward_model/mean"]
                                           + 0.5 * step["rewards/length/mean"], abs=1e-4)
    assert metrics["reward_mean_first"] == pytest.approx(log[0]["reward"])
    assert (grpo_dir / "adapter" / "adapter_config.json").exists()


def test_reward_data_without_rejected_is_exit_2(reward_run, capsys, tmp_path):
    code, _, err = run_cli(["reward", reward_run, "--run-dir", tmp_path / "x",
                            "--set", "data.prefs.columns={rejected = \"worse\"}"], capsys)
    assert code == 2 and "no column 'worse'" in err and "chosen, rejected" in err


def test_ppo_without_reward_stage_is_exit_2(tmp_path, assets, pretrained_model, capsys):
    recipe = rlhf_recipe(tmp_path, assets, pretrained_model)
    code, _, err = run_cli(["ppo", recipe], capsys)
    assert code == 2 and "ppo.reward_model" in err and "does not exist" in err
    assert not (tmp_path / "run" / "ppo").exists()


@pytest.mark.slow
def test_killed_ppo_resumes_to_the_same_step(reward_run, tmp_path, capsys):
    """SIGKILL during PPO leaves no finished-looking stage; the same command resumes from the
    last checkpoint (policy adapter, value model, optimizer, KL coefficient) and completes."""
    args = ["ppo", reward_run, "--run-dir", tmp_path / "run", "--set", "ppo.steps=6",
            "--set", "ppo.save_steps=2",
            "--set", f"ppo.reward_model=\"{reward_run.parent / 'run' / 'reward' / 'model'}\""]
    ckpts = tmp_path / "run" / ".partial" / "ppo" / "checkpoints"
    kill_when(args, lambda: (ckpts / "checkpoint-2" / "trainer_state.json").exists())
    assert not (tmp_path / "run" / "ppo").exists()
    code, _, err = run_cli(args, capsys)  # in-process: the state it resumes from is on disk
    assert code == 0, err[-3000:]
    assert "resuming from" in err
    m = manifest(tmp_path / "run" / "ppo")
    assert m["metrics"]["global_step"] == 6
    steps = [h["step"] for h in json.loads((tmp_path / "run" / "ppo" / "log_history.json")
                                           .read_text()) if "objective/scores" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 6 and len(steps) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo", "grpo"])
def test_killed_trainer_stage_resumes_to_the_same_step(reward_run, tmp_path, stage, capsys):
    """SIGKILL mid-training: nothing finished-looking is left, and the same command resumes from
    the last checkpoint and ends at the step count of an uninterrupted run."""
    args = [stage, reward_run, "--run-dir", tmp_path / "run", "--set", f"{stage}.max_steps=24",
            "--set", f"{stage}.save_steps=4", "--set", f"{stage}.logging_steps=4"]
    if stage == "dpo":
        args += ["--set", "dpo.batch_size=8"]
    if stage == "grpo":  # the reward model is the module's run's, not this run directory's
        args += ["--set", f"grpo.rewards=[{{ kind = \"model\", model = "
                          f"\"{reward_run.parent / 'run' / 'reward' / 'model'}\" }}]"]
    ckpts = tmp_path / "run" / ".partial" / stage / "checkpoints"
    kill_when(args, lambda: (ckpts / "checkpoint-8" / "trainer_state.json").exists())
    assert not (tmp_path / "run" / stage).exists()
    code, _, err = run_cli(args, capsys)  # in-process: the state it resumes from is on disk
    assert code == 0, err[-2000:]
    assert "resuming from" in err
    assert manifest(tmp_path / "run" / stage)["metrics"]["global_step"] == 24


@pytest.mark.slow
def test_ppo_runs_in_two_processes(reward_run, tmp_path):
    """PPO under DDP (2 processes, gloo), with the cross-tokenizer reward."""
    args = ["ppo", reward_run, "--run-dir", tmp_path / "run", "--set", "distributed.strategy=\"ddp\"",
            "--set", "distributed.num_processes=2", "--set", "ppo.steps=2",
            "--set", f"ppo.reward_model=\"{reward_run.parent / 'run' / 'reward' / 'model'}\""]
    done = run_llmctl(args)
    assert done.returncode == 0, done.stderr[-3000:]
    m = manifest(tmp_path / "run" / "ppo")
    assert m["metrics"]["global_step"] == 2 and m["reward_tokenizer_shared"] is False
    assert (tmp_path / "run" / "ppo" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "run" / ".partial" / "ppo").exists()


def test_rpo_adds_the_chosen_nll_to_the_loss(tmp_path):
    """dpo.rpo_alpha: trl's sft loss (the chosen answers' NLL) joins the recipe's, so weighted."""
    from trl import DPOConfig

    from llmctl.schema import DpoConfig
    from llmctl.stages.dpo import dpo_settings

    plain = dpo_settings(DpoConfig(data="p"))
    assert plain["loss_type"] == ["sigmoid"] and "loss_weights" not in plain
    rpo = dpo_settings(DpoConfig(data="p", loss_type="ipo", rpo_alpha=0.5, beta=0.2,
                                 max_length=96))
    assert rpo == {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.2,
                   "max_length": 96}
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **rpo)
    assert args.loss_type == ["ipo", "sft"] and args.loss_weights == [1.0, 0.5]
