"""llmctl.evaluation: lm-evaluation-harness through llmctl's loader, quietly."""

import lm_eval.evaluator
import pytest


def test_lm_eval_leaves_no_git_or_environment_chatter(tiny_lm, tmp_path, monkeypatch, capfd):
    """Outside a git repository lm-eval's own `git describe` printed "fatal: not a git
    repository" in the middle of `llmctl bench`; its environment report started pip; its
    progress bars and its note on already-loaded models filled `quantize` and `bench`. None of
    it shows now (the CLI without --debug), and lm-eval's functions are back in place after."""
    from llmctl import env
    from llmctl.evaluation import lm_eval_tasks
    from llmctl.models import load_causal_lm, load_tokenizer

    monkeypatch.chdir(tmp_path)  # not inside any repository
    monkeypatch.setattr(env, "_quiet", True)  # as quiet_libraries leaves it
    task_path = tiny_choice_task(tmp_path / "tasks")
    before = lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info
    results = lm_eval_tasks(load_causal_lm(str(tiny_lm)), load_tokenizer(str(tiny_lm)),
                            ["tiny_choice"], task_path=task_path, batch_size=2)
    assert 0 <= results["tiny_choice"]["acc"] <= 1
    err = capfd.readouterr().err
    assert "fatal" not in err and "git" not in err, err
    assert "Running loglikelihood" not in err and "pretrained" not in err, err
    assert (lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info) == before


def tiny_choice_task(folder):
    from llmctl.evaluation import write_choice_task

    rows = [{"text": "good news", "label": "yes"}, {"text": "bad news", "label": "no"}]
    write_choice_task(folder, "tiny_choice", rows, "{{text}}", "label", ["yes", "no"])
    return str(folder)


def test_local_tasks_are_indexed_without_the_harness_s_own(tmp_path):
    """Indexing lm-eval's 14,000 task files took 15-30 s of every bench and task-metric
    quantize, in preflight and again in the stage; a task_path that holds every task is enough."""
    from llmctl.evaluation import check_tasks

    manager = check_tasks(["tiny_choice"], tiny_choice_task(tmp_path / "tasks"))
    assert "tiny_choice" in manager.all_tasks and "hellaswag" not in manager.all_tasks


def test_task_path_errors_say_missing_or_not_a_directory(tmp_path):
    from llmctl.errors import UserError
    from llmctl.evaluation import check_tasks

    with pytest.raises(UserError, match=r"^quantize.task_path: \S+/nope does not exist"):
        check_tasks(["tiny_choice"], str(tmp_path / "nope"), "quantize.task")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^bench.task_path: \S+/file is not a directory"):
        check_tasks(["tiny_choice"], str(tmp_path / "file"))


@pytest.mark.slow  # indexes the harness's own tasks
def test_local_and_harness_tasks_together(tmp_path):
    from llmctl.evaluation import check_tasks

    manager = check_tasks(["tiny_choice", "hellaswag"], tiny_choice_task(tmp_path / "tasks"))
    assert {"tiny_choice", "hellaswag"} <= set(manager.all_tasks)


@pytest.mark.parametrize("context", ["The market said", ""])
def test_continuation_logprobs_share_the_prompt_pass_exactly(tiny_lm, context):
    """Label scoring runs the shared prompt once and each label on its KV cache; every score
    must equal the continuation's log-likelihood from a plain full-sequence forward, whether a
    label is one token or several (and with nothing to share, an empty context)."""
    import torch

    from llmctl.evaluation import continuation_logprobs
    from llmctl.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(tiny_lm)).eval(), load_tokenizer(str(tiny_lm))
    continuations = [" up", " down sharply today", " sideways, then up"]
    scores = continuation_logprobs(model, tokenizer, context, continuations)

    ctx_len = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    for cont, score in zip(continuations, scores):
        ids = tokenizer(context + cont, add_special_tokens=False)["input_ids"]
        assert ids[:ctx_len] == tokenizer(context, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        start = max(ctx_len, 1)
        expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))
        assert score == pytest.approx(expected, abs=1e-4), cont
    assert len(set(round(s, 4) for s in scores)) == 3  # the labels are told apart


def test_ppo_gain_error_counts_prompts_not_draws():
    """PPO's held-out gain: a prompt's 4 draws are alike, so its error is over the prompts'
    mean rewards. Two prompts whose draws all move by +1 and by +3: over the prompts the error
    is stdev(1, 3) / sqrt(2) = 1; over the 8 draws it would be 1.07 / sqrt(8) = 0.38."""
    from llmctl.evaluation import paired_sem
    from llmctl.stages.ppo import prompt_means

    before = [0.0] * 8
    after = [1.0] * 4 + [3.0] * 4
    assert prompt_means(after) == [1.0, 3.0]
    assert paired_sem(prompt_means(before), prompt_means(after)) == pytest.approx(1.0)
    assert paired_sem(before, after) < 0.4  # what counting draws as independent says
