"""llmctl.evaluation: lm-evaluation-harness through llmctl's loader, quietly."""

import lm_eval.evaluator


def test_lm_eval_leaves_no_git_or_environment_chatter(tiny_lm, tmp_path, monkeypatch, capfd):
    """Outside a git repository lm-eval's own `git describe` printed "fatal: not a git
    repository" in the middle of `llmctl bench`; its environment report started pip; its
    progress bars and its note on already-loaded models filled `quantize` and `bench`. None of
    it shows now (the CLI without --debug), and lm-eval's functions are back in place after."""
    from llmctl import env
    from llmctl.evaluation import lm_eval_tasks, write_choice_task
    from llmctl.models import load_causal_lm, load_tokenizer

    monkeypatch.chdir(tmp_path)  # not inside any repository
    monkeypatch.setattr(env, "_quiet", True)  # as quiet_libraries leaves it
    rows = [{"text": "good news", "label": "yes"}, {"text": "bad news", "label": "no"}]
    write_choice_task(tmp_path / "tasks", "tiny_choice", rows, "{{text}}", "label", ["yes", "no"])
    before = lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info
    results = lm_eval_tasks(load_causal_lm(str(tiny_lm)), load_tokenizer(str(tiny_lm)),
                            ["tiny_choice"], task_path=str(tmp_path / "tasks"), batch_size=2)
    assert 0 <= results["tiny_choice"]["acc"] <= 1
    err = capfd.readouterr().err
    assert "fatal" not in err and "git" not in err, err
    assert "Running loglikelihood" not in err and "pretrained" not in err, err
    assert (lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info) == before
