"""Data layer: Deep Lake 4.x datasets, prompt templates, streaming token blocks, ingest.

Every stage gets its rows through :func:`open_split`, which applies the recipe's column mapping,
TQL query, row limit and train/eval split, and reads rows in chunks so nothing loads a whole
dataset into memory. Templates turn a row into training text (``render``) or into a prompt for
generation (``prompt``: the text before the template's last field).
"""

from __future__ import annotations

import json
import os
import shutil
import string
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import deeplake
import torch

from llmctl.errors import UserError
from llmctl.paths import demo_hint, is_remote, read_text, replace_dir
from llmctl.schema import DataSource

# The course's templates, by name. A recipe may also give a format string of its own.
TEMPLATES = {
    "text": "{text}",
    "qa": "Question: {question}\n\nAnswer: {answer}",
    "orca": "Question: {question}\n\nAnswer: {response}",
    "sentiment": "{instruction}\n\nContent: {input}\n\nSentiment: {output}",
    "alpaca_prompt": "Question: {input}\n\nAnswer: {response}",
}

CHUNK_ROWS = 256  # rows read from Deep Lake per request while streaming


@dataclass(frozen=True)
class Template:
    text: str

    @classmethod
    def get(cls, name_or_format: str) -> "Template":
        if name_or_format in TEMPLATES:
            return cls(TEMPLATES[name_or_format])
        if "{" not in name_or_format:
            raise UserError(f"template {name_or_format!r}: not a known template "
                            f"({', '.join(TEMPLATES)}) nor a format string with {{fields}}")
        return cls(name_or_format)

    @property
    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.text) if f]

    @property
    def response_field(self) -> str:
        return self.fields[-1]

    @property
    def prompt_fields(self) -> list[str]:
        """The fields a prompt is made of (every one but the response)."""
        return [f for f in self.fields if f != self.response_field]

    def render(self, row: dict[str, Any]) -> str:
        try:
            return self.text.format(**{k: _as_text(v) for k, v in row.items()})
        except KeyError as err:
            raise UserError(f"template {self.text!r}: row has no field {err.args[0]!r} "
                            f"(fields: {', '.join(row)})") from None

    def prompt(self, row: dict[str, Any]) -> str:
        """Everything before the response field: what a model is asked to continue."""
        marker = "{" + self.response_field + "}"
        head = self.text[: self.text.rindex(marker)]
        return Template(head).render(row) if Template(head).fields else head

    def split(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, completion) for completion-only losses, scoring and preference data.

        The space before the response moves to the completion: BPE tokenizers join it to the
        next word (" negative"), so prompt + completion tokenize as the rendered text does.
        """
        prompt = self.prompt(row)
        context = prompt.rstrip(" ")
        return context, prompt[len(context):] + _as_text(row[self.response_field])

    def response(self, row: dict[str, Any]) -> str:
        return _as_text(row[self.response_field])

    def context(self, row: dict[str, Any]) -> str:
        """What a model is asked to continue, for a row without its response."""
        return self.split({**row, self.response_field: ""})[0]


@dataclass(frozen=True)
class ChatTemplate:
    """``template = "chat"``: rows as conversations, rendered by the tokenizer's chat template,
    so a chat model is trained and prompted the way it was made. Same interface as
    :class:`Template`: the prompt is the conversation up to the assistant's answer, with the
    template's generation prompt (``<|im_start|>assistant\\n``)."""

    tokenizer: Any
    system: str | None = None
    user: str | None = None  # a format string over row fields; None: a `messages` field
    assistant: str = "response"

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"template = \"chat\": the tokenizer "
                            f"{getattr(self.tokenizer, 'name_or_path', '')} has no chat template "
                            f"(use a named template or a format string)")

    @property
    def fields(self) -> list[str]:
        return chat_fields(self.user, self.assistant)

    @property
    def response_field(self) -> str:
        return self.assistant if self.user is not None else "messages"

    @property
    def prompt_fields(self) -> list[str]:
        """The user turn's fields, or the `messages` field, whose last answer is the response."""
        return ["messages"] if self.user is None else Template(self.user).fields

    def turns(self, row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
        return chat_turns(row, self.system, self.user, self.assistant)

    def prompt(self, row: dict[str, Any]) -> str:
        messages, _ = self.turns(row)
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def render(self, row: dict[str, Any]) -> str:
        messages, answer = self.turns(row)
        return self.tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False)

    def split(self, row: dict[str, Any]) -> tuple[str, str]:
        prompt, full = self.prompt(row), self.render(row)
        return prompt, full[len(prompt):] if full.startswith(prompt) else self.response(row)

    def response(self, row: dict[str, Any]) -> str:
        return self.turns(row)[1]

    def context(self, row: dict[str, Any]) -> str:
        return self.prompt(row)


def chat_fields(user: str | None, assistant: str) -> list[str]:
    return ["messages"] if user is None else [*Template(user).fields, assistant]


def chat_turns(row: dict[str, Any], system: str | None, user: str | None, assistant: str
               ) -> tuple[list[dict[str, str]], str]:
    """(the conversation before the answer, the answer) of a row: its `messages` up to the last
    assistant turn, or a system prompt and the `user` format string, answered by `assistant`."""
    if user is None:
        messages = chat_messages(row.get("messages"))
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                   default=len(messages))
        return messages[:last], messages[last]["content"] if last < len(messages) else ""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": Template(user).render(row)}], \
        _as_text(row.get(assistant, ""))


def chat_messages(value: Any) -> list[dict[str, str]]:
    """A `messages` value (a list, or its JSON text as ingest stores it) as {role, content}s."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        raise UserError("template = \"chat\": a `messages` value is not a list of "
                        "{\"role\": ..., \"content\": ...} objects")
    return [{"role": str(m["role"]), "content": _as_text(m["content"])} for m in value]


def make_template(source: DataSource, tokenizer) -> Template | ChatTemplate:
    """The row template of a data source: named, a format string, or the tokenizer's chat."""
    if source.template == "chat":
        return ChatTemplate(tokenizer, source.system, source.user, source.assistant)
    return Template.get(source.template)


def preference_template(source: DataSource, tokenizer) -> Template | ChatTemplate:
    """Preference rows as their prompt answered by `chosen`: how DPO's data reads as a labelled
    task. With ``template = "chat"`` the prompt is a user turn (after the `system` prompt)."""
    if source.template == "chat":
        return ChatTemplate(tokenizer, source.system, PREFERENCE_USER, "chosen")
    return Template("{prompt}{chosen}")


PREFERENCE_USER = "{prompt}"  # chat preference data: the prompt column is the user's turn


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


# -- opening datasets ---------------------------------------------------------------------------


def _token() -> str | None:
    # Read from the environment at the moment of use; never written anywhere.
    return os.environ.get("ACTIVELOOP_TOKEN") or None


def open_dataset(path: str, key: str = "data.path"):
    """Open a Deep Lake dataset read-only: local directory, mem://, hub:// or al://."""
    if not is_remote(path) and not path.startswith("mem://"):
        if not Path(path).exists():
            raise UserError(f"{key}: dataset {path} does not exist{demo_hint(path)}")
    try:
        return deeplake.open_read_only(path, token=_token()) if is_remote(path) \
            else deeplake.open_read_only(path)
    except Exception as err:  # deeplake raises its own types for missing/unauthorised datasets
        hint = " (set ACTIVELOOP_TOKEN for hub:// datasets)" if is_remote(path) and not _token() else ""
        raise UserError(f"{key}: cannot open dataset {path}: {_one_line(err)}{hint}") from None


def column_names(ds) -> list[str]:
    return [c.name for c in ds.schema.columns]


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300] or "no reason given"


def run_query(ds, query: str, key: str):
    try:
        return ds.query(query)
    except Exception as err:
        raise UserError(f"{key}: query failed: {_one_line(err)}") from None


@dataclass
class Split:
    """Rows ``[start, stop)`` of a (queried) dataset, with template fields mapped to columns."""

    view: Any
    start: int
    stop: int
    columns: dict[str, str]  # field -> column
    path: str

    def __len__(self) -> int:
        return self.stop - self.start

    def iter_chunks(self, chunk: int = CHUNK_ROWS) -> Iterator[list[dict[str, Any]]]:
        for lo in range(self.start, self.stop, chunk):
            hi = min(lo + chunk, self.stop)
            block = self.view[lo:hi]
            cols = {field: _to_list(block[col]) for field, col in self.columns.items()}
            yield [{field: values[i] for field, values in cols.items()} for i in range(hi - lo)]

    def iter_rows(self, chunk: int = CHUNK_ROWS) -> Iterator[dict[str, Any]]:
        for rows in self.iter_chunks(chunk):
            yield from rows

    def rows(self) -> list[dict[str, Any]]:
        return list(self.iter_rows())


def _to_list(values: Any) -> list:
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def open_split(source: DataSource, fields: list[str], split: str, key: str) -> Split:
    """Open the train or eval split of a recipe data source, checking that every field maps to a column."""
    columns = {f: source.columns.get(f, f) for f in fields}
    if split == "eval" and source.eval_path:
        ds = open_dataset(source.eval_path, f"{key}.eval_path")
        path = source.eval_path
        query = source.eval_query or source.query
    else:
        ds = open_dataset(source.path, f"{key}.path")
        path = source.path
        query = source.query
    have = column_names(ds)
    for field, col in columns.items():
        if col not in have:
            where = f"{key}.columns.{field}" if field in source.columns else f"{key}.columns"
            raise UserError(f"{where}: dataset {path} has no column '{col}' "
                            f"(needed for field '{field}'; columns: {', '.join(have)})")
    view = run_query(ds, query, f"{key}.query") if query else ds
    n = len(view)
    if source.limit is not None:
        n = min(n, source.limit)
    if split == "eval" and source.eval_path:
        start, stop = 0, n
    else:
        n_eval = int(round(n * source.eval_fraction)) if not source.eval_path else 0
        if source.eval_fraction > 0 and not source.eval_path and n > 1:
            n_eval = max(n_eval, 1)
        start, stop = (0, n - n_eval) if split == "train" else (n - n_eval, n)
    if stop <= start:
        raise UserError(f"{key}: the {split} split of {path} is empty "
                        f"({n} rows after query/limit; eval_fraction={source.eval_fraction})")
    return Split(view, start, stop, columns, path)


def preference_split(source: DataSource, split: str, key: str) -> Split:
    """chosen/rejected pairs, with the prompt when the source maps one or the dataset has one."""
    ds = open_dataset(source.eval_path if split == "eval" and source.eval_path else source.path,
                      f"{key}.path")
    has_prompt = "prompt" in source.columns or "prompt" in column_names(ds)
    return open_split(source, (["prompt"] if has_prompt else []) + ["chosen", "rejected"], split, key)


def _hf_rows(source_json: str, split: str, key: str, layout: str):
    """Generator for datasets.Dataset.from_generator (top level, so the datasets cache can hash it)."""
    source = DataSource.model_validate_json(source_json)
    if layout == "preference":
        for row in preference_split(source, split, key).iter_rows():
            row = {k: _as_text(v) for k, v in row.items()}
            if source.template == "chat" and "prompt" in row:
                # trl's conversational preference format: it applies the chat template itself.
                prompt, _ = chat_turns(row, source.system, PREFERENCE_USER, "chosen")
                row = {"prompt": prompt,
                       "chosen": [{"role": "assistant", "content": row["chosen"]}],
                       "rejected": [{"role": "assistant", "content": row["rejected"]}]}
            yield row
        return
    if source.template == "chat":
        # trl's conversational format: it applies the tokenizer's chat template itself and
        # trains on the completion (the assistant's turn) only.
        for row in open_split(source, chat_fields(source.user, source.assistant), split,
                              key).iter_rows():
            prompt, answer = chat_turns(row, source.system, source.user, source.assistant)
            yield {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}
        return
    template = Template.get(source.template)
    for row in open_split(source, template.fields, split, key).iter_rows():
        if layout == "prompt_completion":
            prompt, completion = template.split(row)
            yield {"prompt": prompt, "completion": completion}
        else:
            yield {"text": template.render(row)}


def hf_dataset(source: DataSource, split: str, key: str, layout: str, cache_dir: str):
    """A split as an on-disk Arrow dataset for trl (memory-mapped, never all in RAM).

    ``layout``: "text" (rendered template), "prompt_completion" (template split at its response
    field) or "preference" (prompt?/chosen/rejected columns).
    """
    from datasets import Dataset

    return Dataset.from_generator(
        _hf_rows, cache_dir=cache_dir, keep_in_memory=False,
        gen_kwargs={"source_json": source.model_dump_json(), "split": split, "key": key,
                    "layout": layout})


# -- token streams ---------------------------------------------------------------------------------


class TokenBlocks(torch.utils.data.IterableDataset):
    """Rendered rows, tokenized chunk by chunk, as fixed-length causal-LM examples.

    ``pack=True`` concatenates documents (each ended by eos) and cuts ``seq_len`` blocks, as the
    course's ConstantLengthDataset does; ``pack=False`` truncates and pads each document.
    ``repeat=True`` cycles forever, so a Trainer run is defined by its step count alone and a
    resumed run replays exactly the batches the interrupted one would have seen.
    """

    def __init__(self, split: Split, template: Template, tokenizer, seq_len: int,
                 pack: bool = True, repeat: bool = False):
        self.split, self.template, self.tokenizer = split, template, tokenizer
        self.seq_len, self.pack, self.repeat = seq_len, pack, repeat

    def _token_chunks(self) -> Iterator[list[list[int]]]:
        eos = self.tokenizer.eos_token_id
        for rows in self.split.iter_chunks():
            texts = [self.template.render(r) for r in rows]
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            yield [doc + [eos] for doc in ids]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from (self._packed() if self.pack else self._padded())
            if not self.repeat:
                return

    def _packed(self) -> Iterator[dict[str, torch.Tensor]]:
        buffer: list[int] = []
        for docs in self._token_chunks():
            for doc in docs:
                buffer.extend(doc)
            n_blocks = len(buffer) // self.seq_len
            for b in range(n_blocks):
                block = torch.tensor(buffer[b * self.seq_len:(b + 1) * self.seq_len])
                yield {"input_ids": block, "attention_mask": torch.ones_like(block),
                       "labels": block.clone()}
            buffer = buffer[n_blocks * self.seq_len:]

    def _padded(self) -> Iterator[dict[str, torch.Tensor]]:
        pad = self.tokenizer.pad_token_id
        for docs in self._token_chunks():
            for doc in docs:
                doc = doc[: self.seq_len]
                n = len(doc)
                ids = torch.tensor(doc + [pad] * (self.seq_len - n))
                mask = torch.zeros(self.seq_len, dtype=torch.long)
                mask[:n] = 1
                labels = ids.clone()
                labels[n:] = -100
                yield {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def count(self) -> int:
        """Examples in one pass (tokenizes the split once, keeping only counts)."""
        if not self.pack:
            return len(self.split)
        return sum(len(doc) for docs in self._token_chunks() for doc in docs) // self.seq_len


def token_blocks(source: DataSource, key: str, split: str, tokenizer, seq_len: int,
                 max_blocks: int | None = None, pack: bool = True) -> list[dict[str, torch.Tensor]]:
    """Up to ``max_blocks`` packed blocks of a split: evaluation and calibration batches."""
    template = make_template(source, tokenizer)
    blocks = list(islice(TokenBlocks(open_split(source, template.fields, split, key), template,
                                     tokenizer, seq_len, pack), max_blocks))
    if not blocks:
        raise UserError(f"{key}: the {split} split holds fewer than seq_len={seq_len} tokens "
                        f"(raise eval_fraction, set eval_path or lower seq_len)")
    return blocks


def heldout_blocks(source: DataSource, name: str, tokenizer, cfg) -> list[dict[str, torch.Tensor]]:
    """The eval-split blocks a quantize or bench table scores perplexity on: ``eval_max_batches``
    batches of ``eval_batch_size`` blocks of ``seq_len`` tokens (all blocks when unset)."""
    cap = cfg.eval_max_batches * cfg.eval_batch_size if cfg.eval_max_batches else None
    return token_blocks(source, f"data.{name}", "eval", tokenizer, cfg.seq_len, cap)


# -- ingest / show / query (the `llmctl data` commands) -------------------------------------------


def read_records(path: Path, text_column: str = "text") -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if suffix in (".jsonl", ".json"):
        records = []
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{n}: invalid JSON: {err.msg}") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{n}: not a JSON object (one record per line)")
                records.append(record)
        return records
    if suffix in (".csv", ".tsv"):
        import io

        import pandas as pd

        try:
            frame = pd.read_csv(io.StringIO(read_text(path)), sep="\t" if suffix == ".tsv" else ",")
        except (ValueError, pd.errors.ParserError) as err:
            raise UserError(f"{path}: cannot parse as {suffix[1:].upper()}: "
                            f"{' '.join(str(err).split())[:200]}") from None
        return frame.to_dict("records")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for a broken file vary
            raise UserError(f"{path}: cannot read as Parquet: {_one_line(err)}") from None
    if suffix in (".txt", ".md", ".text", ""):
        # Paragraphs (blank-line separated) are the natural documents of a plain-text file.
        paragraphs = [p.strip() for p in read_text(path).split("\n\n")]
        return [{text_column: p} for p in paragraphs if p]
    raise UserError(f"{path}: unsupported file type '{suffix}' (jsonl, csv, tsv, parquet, txt)")


def _column_type(values: list[Any]):
    if all(isinstance(v, bool) for v in values):
        return deeplake.types.Bool()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return deeplake.types.Int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return deeplake.types.Float64()
    return deeplake.types.Text()


def write_dataset(dest: str, records: list[dict[str, Any]], message: str,
                  overwrite: bool = False) -> int:
    """Create a Deep Lake dataset from records (all with the same keys) and commit it."""
    if not records:
        raise UserError(f"{dest}: nothing to ingest (no records)")
    names = list(records[0])
    for i, rec in enumerate(records):
        if list(rec) != names and set(rec) != set(names):
            raise UserError(f"record {i}: columns {sorted(rec)} differ from {sorted(names)}")
    local = not is_remote(dest) and not dest.startswith("mem://")
    if local and Path(dest).exists():
        if not overwrite:
            raise UserError(f"{dest}: already exists (pass --overwrite to replace it)")
        # --overwrite replaces a dataset, never anything else that happens to live there.
        if not Path(dest).is_dir() or not deeplake.exists(dest):
            raise UserError(f"{dest}: exists and is not a Deep Lake dataset; llmctl will not "
                            f"delete it (choose another --to)")
    if not local:
        _fill(deeplake.create(dest, token=_token()) if is_remote(dest) else deeplake.create(dest),
              names, records, message)
        return len(records)
    # Written beside the destination and swapped in: a failed ingest leaves the old dataset.
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.ingest-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _fill(deeplake.create(str(staging)), names, records, message)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(records)


def _fill(ds, names: list[str], records: list[dict[str, Any]], message: str) -> None:
    columns = {name: [rec.get(name) for rec in records] for name in names}
    for name, values in columns.items():
        kind = _column_type(values)
        if isinstance(kind, type(deeplake.types.Text())):
            columns[name] = _text_column(values)
        ds.add_column(name, kind)
    ds.append(columns)
    ds.commit(message)


def _text_column(values: list[Any]) -> list[str]:
    # lists and objects (a `messages` column) as JSON, which template = "chat" reads
    return ["" if v is None else v if isinstance(v, str) else
            json.dumps(v) if isinstance(v, (list, dict)) else str(v) for v in values]


def append_records(dest: str, records: list[dict[str, Any]], message: str) -> int:
    """Append rows to an existing dataset (same columns) as one new commit; on any refusal
    nothing is written."""
    if not records:
        raise UserError(f"{dest}: nothing to append (no records)")
    if not is_remote(dest) and not dest.startswith("mem://") and not Path(dest).exists():
        raise UserError(f"--to: dataset {dest} does not exist (ingest without --append to "
                        f"create it)")
    try:
        ds = deeplake.open(dest, token=_token()) if is_remote(dest) else deeplake.open(dest)
    except Exception as err:  # deeplake's own types for a missing or unreadable dataset
        raise UserError(f"--to: cannot open dataset {dest}: {_one_line(err)}") from None
    kinds = {c.name: str(c.dtype) for c in ds.schema.columns}
    for i, rec in enumerate(records):
        if set(rec) != set(kinds):
            raise UserError(f"record {i}: columns {sorted(rec)} differ from the dataset's "
                            f"{sorted(kinds)}")
    columns = {name: [rec.get(name) for rec in records] for name in kinds}
    for name, values in columns.items():
        if "text" in kinds[name].lower():
            columns[name] = _text_column(values)
    try:
        ds.append(columns)
    except Exception as err:  # a value of the wrong type for its column
        ds.rollback()
        raise UserError(f"{dest}: cannot append: {_one_line(err)}") from None
    ds.commit(message)
    return len(records)


def dataset_log(path: str) -> list[dict[str, Any]]:
    """A dataset's commits, oldest first: version id, time and message. (No per-commit row
    count: deeplake 4.7's ``Version.open()`` fails on a read-only dataset.)"""
    ds = open_dataset(path, "path")
    return [{"version": v.id, "time": str(v.timestamp), "message": v.message}
            for v in ds.history]


def preview(view, limit: int, columns: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    names = columns or column_names(view)
    n = min(limit, len(view))
    block = view[0:n] if n else None
    rows = []
    if block is not None:
        cols = [_to_list(block[c]) for c in names]
        rows = [[_as_text(col[i]) for col in cols] for i in range(n)]
    return names, rows


def check_row_format(text: str | None, source: DataSource, key: str) -> None:
    """A format string over a prompt row (``ppo.reward_text``, a GRPO model reward's ``text``)
    may name the source's prompt fields and {response}, nothing else: checked in preflight."""
    if not text:
        return
    if source.template == "chat":
        fields = ["messages"] if source.user is None else Template(source.user).fields
    else:
        fields = Template.get(source.template).prompt_fields
    unknown = [f for f in Template(text).fields if f not in [*fields, "response"]]
    if unknown:
        raise UserError(f"{key}: {{{unknown[0]}}} is not a field of the prompts "
                        f"(fields: {', '.join([*fields, 'response'])})")
