"""Data layer: Deep Lake round trip, TQL queries, splits, templates, ingest, errors."""

import json

import pytest

from llmctl.data import Template, TokenBlocks, open_split, read_records, write_dataset
from llmctl.errors import UserError
from llmctl.schema import DataSource


@pytest.fixture
def qa_ds(tmp_path):
    path = str(tmp_path / "qa")
    rows = [{"question": f"What is {i} plus 1?", "answer": str(i + 1), "n": i} for i in range(50)]
    write_dataset(path, rows, "qa rows")
    return path


def test_round_trip_and_split(qa_ds):
    source = DataSource(path=qa_ds, template="qa", eval_fraction=0.1)
    train = open_split(source, ["question", "answer"], "train", "data.qa")
    evals = open_split(source, ["question", "answer"], "eval", "data.qa")
    assert (len(train), len(evals)) == (45, 5)
    rows = train.rows()
    assert rows[0] == {"question": "What is 0 plus 1?", "answer": "1"}
    assert evals.rows()[0]["answer"] == "46"
    # chunked streaming yields the same rows as one read
    assert list(train.iter_rows(chunk=7)) == rows


def test_query_limit_and_column_mapping(qa_ds):
    source = DataSource(path=qa_ds, columns={"text": "question"}, template="text",
                        query="SELECT * WHERE n >= 40", eval_fraction=0.0)
    split = open_split(source, ["text"], "train", "data.q")
    assert [r["text"] for r in split.rows()][:2] == ["What is 40 plus 1?", "What is 41 plus 1?"]
    assert len(split) == 10
    limited = open_split(source.model_copy(update={"limit": 3}), ["text"], "train", "data.q")
    assert len(limited) == 3


def test_missing_column_names_column_and_columns(qa_ds):
    source = DataSource(path=qa_ds, columns={"answer": "response"})
    with pytest.raises(UserError) as err:
        open_split(source, ["question", "answer"], "train", "data.qa")
    msg = str(err.value)
    assert "data.qa.columns.answer" in msg and "'response'" in msg
    assert "question, answer, n" in msg


def test_missing_dataset_and_bad_query(tmp_path, qa_ds):
    with pytest.raises(UserError, match="data.x.path: dataset .*nope does not exist"):
        open_split(DataSource(path=str(tmp_path / "nope")), ["text"], "train", "data.x")
    with pytest.raises(UserError, match="data.x.query: query failed"):
        open_split(DataSource(path=qa_ds, query="SELEKT nonsense"), ["question"], "train", "data.x")


def test_templates():
    qa = Template.get("qa")
    row = {"question": "Why?", "answer": "Because."}
    assert qa.render(row) == "Question: Why?\n\nAnswer: Because."
    assert qa.prompt(row) == "Question: Why?\n\nAnswer: "
    senti = Template.get("sentiment")
    row = {"instruction": "Sentiment?", "input": "Shares fell.", "output": "negative"}
    assert senti.render(row) == "Sentiment?\n\nContent: Shares fell.\n\nSentiment: negative"
    assert senti.split(row) == ("Sentiment?\n\nContent: Shares fell.\n\nSentiment:", " negative")
    assert Template.get("Q: {q} A: {a}").fields == ["q", "a"]
    with pytest.raises(UserError, match="no field 'answer'"):
        qa.render({"question": "x"})
    with pytest.raises(UserError, match="not a known template"):
        Template.get("alpaca-ish")


def test_token_blocks_pack_and_pad(qa_ds, tokenizer):
    source = DataSource(path=qa_ds, template="qa", eval_fraction=0.0)
    split = open_split(source, ["question", "answer"], "train", "data.qa")
    template = Template.get("qa")
    docs = [tokenizer(template.render(r))["input_ids"] + [tokenizer.eos_token_id]
            for r in split.rows()]
    stream = [t for d in docs for t in d]
    packed = list(TokenBlocks(split, template, tokenizer, seq_len=16, pack=True))
    assert len(packed) == len(stream) // 16 == TokenBlocks(split, template, tokenizer, 16).count()
    assert packed[1]["input_ids"].tolist() == stream[16:32]
    assert packed[1]["labels"].tolist() == stream[16:32]
    padded = list(TokenBlocks(split, template, tokenizer, seq_len=64, pack=False))
    assert len(padded) == len(split)
    first = padded[0]
    n = len(docs[0])
    assert first["attention_mask"].sum() == n and first["input_ids"][:n].tolist() == docs[0]
    assert (first["labels"][n:] == -100).all()
    # repeat=True cycles: the stream starts over after one pass
    cycled = TokenBlocks(split, template, tokenizer, seq_len=16, pack=True, repeat=True)
    it = iter(cycled)
    again = [next(it) for _ in range(len(packed) + 1)][-1]
    assert again["input_ids"].tolist() == packed[0]["input_ids"].tolist()


def test_ingest_formats(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i}", "label": i % 2}) for i in range(5)))
    txt = tmp_path / "b.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    csv = tmp_path / "c.csv"
    csv.write_text("text,label\nhello,1\nworld,0\n")
    assert len(read_records(jsonl)) == 5
    assert read_records(txt) == [{"text": "first paragraph\nstill first"}, {"text": "second paragraph"}]
    assert read_records(csv)[1] == {"text": "world", "label": 0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl:2: invalid JSON"):
        read_records(bad)
    dest = str(tmp_path / "ds")
    write_dataset(dest, read_records(jsonl), "first")
    with pytest.raises(UserError, match="already exists"):
        write_dataset(dest, read_records(jsonl), "again")


def _dataset_state(path) -> tuple:
    """What a reader sees: the rows, and the commit messages."""
    import deeplake

    ds = deeplake.open_read_only(str(path))
    return (tuple(ds["text"][:]) if len(ds) else (),
            tuple(v.message for v in ds.history))


@pytest.mark.slow
def test_sigkill_during_append_leaves_the_previous_or_the_new_commit(tmp_path):
    """`data ingest --append` killed at several points (reading the file; from its first write
    to the dataset until it exits) leaves the dataset at its previous commit or at the new
    one, never between, and appendable."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from llmctl.data import append_records
    from tests.conftest import REPO

    base = tmp_path / "base"
    write_dataset(str(base), [{"text": f"row {i}"} for i in range(50)], "first")
    more = tmp_path / "more.jsonl"  # large enough that writing and committing take a while
    more.write_text("".join(json.dumps({"text": f"new row {i}"}) + "\n" for i in range(100_000)))
    before = _dataset_state(base)

    def files(root) -> set[str]:
        return {os.path.relpath(os.path.join(d, f), root)
                for d, _, names in os.walk(root) for f in names}

    base_files = files(base)

    def append(name: str, kill_at=None) -> tuple:
        """Append in a new process; SIGKILL it once kill_at(seconds since start, seconds to
        the dataset's first change or None before one, the dataset's folder) is true.
        (state, exit code, first change, end) in seconds since start."""
        ds = tmp_path / name
        shutil.copytree(base, ds)
        old_files = files(ds)
        proc = subprocess.Popen([sys.executable, "-m", "llmctl", "data", "ingest", str(more),
                                 "--to", str(ds), "--append", "-m", "more"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        t0, changed = time.time(), None
        while proc.poll() is None:
            now = time.time() - t0
            if changed is None and files(ds) != old_files:
                changed = now
            if kill_at is not None and kill_at(now, changed, ds):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        return _dataset_state(ds), proc.returncode, changed, time.time() - t0

    after, code, first_write, end = append("whole")
    assert code == 0 and len(after[0]) == 100_050 and after[1] == (*before[1], "more")
    assert first_write is not None
    window = end - first_write
    points = [("reading", lambda now, changed, ds: now >= first_write / 2)]
    points += [(f"{f:.0%} of writing", lambda now, changed, ds, f=f: changed is not None
                and now >= changed + f * window) for f in (0.0, 0.02, 0.05, 0.1, 0.25)]
    # The riskiest moment: deeplake writes a commit's chunks, then its log entry; kill as soon
    # as that entry appears (it may be half written).
    points.append(("log entry", lambda now, changed, ds: any(
        f.endswith(".jsonl.lz4") and f not in base_files for f in files(ds))))
    outcomes = []
    for label, kill_at in points:
        state, code, _, _ = append(label.replace(" ", "-").replace("%", ""), kill_at)
        assert state in (before, after), (label, code, len(state[0]), state[1])
        outcomes.append((label, code, "new" if state == after else "previous"))
    # The kills landed while it worked, not all after it had finished. (Whether one lands
    # between the commit and the exit is luck: on a slow CI box all of them came before it.)
    assert sum(code == -signal.SIGKILL for _, code, _ in outcomes) >= 4, outcomes
    # A killed append leaves the dataset appendable: the next one commits on top.
    ds = tmp_path / "reading"
    append_records(str(ds), [{"text": "last"}], "last")
    assert _dataset_state(ds)[1] == (*before[1], "last"), outcomes
    print(outcomes)
