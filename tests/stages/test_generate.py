"""`llmctl generate`: every decoding mode, templates, stop sequences, JSON output, errors."""

import json

import pytest

from tests.conftest import manifest, recipe_head, run_cli


@pytest.fixture
def gen_recipe(tmp_path, assets, pretrained_model):
    path = tmp_path / "gen.toml"
    path.write_text(recipe_head(tmp_path / "run", "gen") + f"""
[generate]
model = "{pretrained_model}"
max_new_tokens = 6
""")
    return path


@pytest.mark.parametrize("mode", [
    [],  # greedy
    ["generate.do_sample=true", "generate.top_k=5", "generate.top_p=0.9", "generate.temperature=0.7"],
    ["generate.num_beams=3", "generate.length_penalty=2.0", "generate.num_return_sequences=2"],
    ["generate.repetition_penalty=1.5", "generate.min_new_tokens=6", "generate.no_repeat_ngram_size=2"],
    ["generate.do_sample=true", "generate.num_return_sequences=3"],
])
def test_decoding_modes(gen_recipe, capsys, mode):
    sets = [a for m in mode for a in ("--set", m)]
    code, out, err = run_cli(["generate", gen_recipe, "-p", "The function", "-p", "Return", "--json",
                              *sets], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["The function", "Return"]
    expected = 2 if "generate.num_return_sequences=2" in mode else 3 if "generate.num_return_sequences=3" in mode else 1
    assert all(len(r["completions"]) == expected for r in rows)
    assert all(isinstance(c, str) for r in rows for c in r["completions"])
    m = manifest(gen_recipe.parent / "run" / "generate")
    assert m["metrics"]["new_tokens"] > 0 and m["metrics"]["num_prompts"] == 2


def test_greedy_is_deterministic_and_min_tokens_respected(gen_recipe, capsys):
    outs = []
    for _ in range(2):
        code, out, err = run_cli(["generate", gen_recipe, "-p", "The", "--json",
                                  "--set", "generate.min_new_tokens=6"], capsys)
        assert code == 0, err
        outs.append(json.loads(out)["completions"][0])
    assert outs[0] == outs[1]
    # eos is suppressed until min_new_tokens: exactly 6 new tokens
    assert manifest(gen_recipe.parent / "run" / "generate")["metrics"]["new_tokens"] == 6


def test_stop_sequences_cut_output(gen_recipe, capsys):
    code, out, _ = run_cli(["generate", gen_recipe, "-p", "The", "--json",
                            "--set", "generate.max_new_tokens=20"], capsys)
    full = json.loads(out)["completions"][0]
    assert len(full) >= 6, full
    stop = full[3:5]
    code, out, err = run_cli(["generate", gen_recipe, "-p", "The", "--json",
                              "--set", "generate.max_new_tokens=20",
                              "--set", f"generate.stop={json.dumps([stop])}"], capsys)
    assert code == 0, err
    cut = json.loads(out)["completions"][0]
    assert stop not in cut and full.startswith(cut) and len(cut) < len(full)


def test_template_and_prompts_file(gen_recipe, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 2?\n\nName a colour.\n")
    code, out, err = run_cli(["generate", gen_recipe, "--prompts-file", prompts,
                              "--set", "generate.template=\"qa\""], capsys)
    assert code == 0, err
    assert "Question: What is 2 plus 2?\n\nAnswer:" in out and "Question: Name a colour." in out
    m = manifest(gen_recipe.parent / "run" / "generate")
    rows = [json.loads(line) for line in
            (gen_recipe.parent / "run" / "generate" / "generations.jsonl").read_text().splitlines()]
    # the trailing space of the template's prompt goes with the answer's first token
    assert rows[0]["input"] == "Question: What is 2 plus 2?\n\nAnswer:"
    assert m["outputs"]["generations"] == "generations.jsonl"


def test_multi_field_template_takes_json_prompts(gen_recipe, capsys):
    prompt = json.dumps({"instruction": "Sentiment?", "input": "Shares fell."})
    code, out, err = run_cli(["generate", gen_recipe, "-p", prompt, "--json",
                              "--set", "generate.template=\"sentiment\""], capsys)
    assert code == 0, err
    code, _, err = run_cli(["generate", gen_recipe, "-p", "plain text",
                            "--set", "generate.template=\"sentiment\""], capsys)
    assert code == 2 and "give each prompt as a JSON object" in err


def test_errors(gen_recipe, capsys, tmp_path):
    code, _, err = run_cli(["generate", gen_recipe, "--set", f"generate.model=\"{tmp_path}/none/model\""], capsys)
    assert code == 2 and "generate.model:" in err and "does not exist" in err
    code, _, err = run_cli(["generate", gen_recipe], capsys)
    assert code == 2 and "generate.prompts: no prompts" in err


def test_command_line_prompts_replace_the_recipes(gen_recipe, capsys, monkeypatch, tmp_path):
    import io

    gen_recipe.write_text(gen_recipe.read_text() + 'prompts = ["From the recipe"]\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("From the file\n")

    def asked(*args, stdin=None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code, out, err = run_cli(["generate", gen_recipe, "--json", *args], capsys)
        assert code == 0, err
        return [json.loads(line)["prompt"] for line in out.strip().splitlines()]

    assert asked() == ["From the recipe"]
    assert asked("-p", "From -p") == ["From -p"]
    assert asked("--prompts-file", prompts) == ["From the file"]
    assert asked("-p", "From -p", "--prompts-file", prompts) == ["From -p", "From the file"]
    assert asked("--prompts-file", "-", stdin="From stdin\n\nAnd more\n") == ["From stdin",
                                                                             "And more"]


def test_adhoc_generation_needs_no_recipe_and_writes_no_run(pretrained_model, capsys, tmp_path):
    run = pretrained_model.parents[1]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    out_file = tmp_path / "out.jsonl"
    code, out, err = run_cli(["generate", "--model", "pretrain", "--run-dir", run, "-p", "The",
                              "--json", "--out", out_file, "--set", "generate.max_new_tokens=4"],
                             capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["prompt"] == "The" and len(row["completions"]) == 1
    assert json.loads(out_file.read_text())["completions"] == row["completions"]
    # a path works as well as a stage name, and gives the same greedy text
    code, by_path, err = run_cli(["generate", "--model", pretrained_model, "-p", "The", "--json",
                                  "--set", "generate.max_new_tokens=4"], capsys)
    assert code == 0 and json.loads(by_path) == row, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written
    code, _, err = run_cli(["generate", "--model", "pretrain", "--run-dir", run, "-p", "x",
                            "--out", out_file], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["generate", "-p", "x"], capsys)
    assert code == 2 and "--model for ad-hoc generation" in err
