"""Fine-tuning data: the embedded Python-docs chat set, or a user's mlx-lm data folder.

The embedded set is built from `pydoc_data.topics`, which ships with every CPython:
each documentation topic becomes one or more chat examples ("Explain Python's `with`
statement" -> the topic's text), cut at paragraph boundaries to at most `max_chars`.
The train/valid split is by topic and deterministic. A user's folder holds mlx-lm's
`train.jsonl` / `valid.jsonl` (records with `messages`, `prompt`/`completion` or
`text`) and is read through mlx-lm's own dataset code.
"""

import hashlib
import json
import re
import types
from pathlib import Path

DEFAULT_MAX_CHARS = 1500
VALID_FRACTION = 0.1


class DataError(ValueError):
    """Fine-tuning data is missing or malformed."""


def _question(text):
    """The chat prompt for a topic, from its heading ('The "with" statement')."""
    heading = text.split("\n", 1)[0].strip()
    heading = re.sub(r'"([^"]+)"', r"`\1`", heading)
    if heading.startswith("The "):
        return f"Explain Python's {heading[4:]}."
    return f"Explain {heading} in Python."


def _body(text):
    """A topic's text without its underlined heading."""
    lines = text.split("\n")
    if len(lines) > 1 and set(lines[1]) <= set("*=-") and lines[1]:
        lines = lines[2:]
    return "\n".join(lines).strip()


def _chunks(body, max_chars):
    """Split at blank lines into pieces of at most max_chars (a long paragraph is cut)."""
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", body):
        while len(para) > max_chars:
            pieces.append(para[:max_chars])
            para = para[max_chars:]
        if current and len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return pieces


def _is_valid_topic(name):
    """Deterministic, platform-independent split of topics into train/valid."""
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < VALID_FRACTION


def pydoc_records(max_chars=DEFAULT_MAX_CHARS):
    """Return (train, valid) lists of chat records built from pydoc_data.topics."""
    if max_chars < 100:
        raise DataError(f"max_chars={max_chars} is too small; use at least 100")
    from pydoc_data.topics import topics

    train, valid = [], []
    for name in sorted(topics):
        text = topics[name]
        question = _question(text)
        parts = _chunks(_body(text), max_chars)
        for i, part in enumerate(parts):
            q = question if len(parts) == 1 else f"{question} (part {i + 1} of {len(parts)})"
            record = {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": part},
                ]
            }
            (valid if _is_valid_topic(name) else train).append(record)
    return train, valid


def write_jsonl(records, path):
    """Write records as one JSON object a line (the mlx-lm data format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def export_pydoc(folder, max_chars=DEFAULT_MAX_CHARS):
    """Write the embedded set as an mlx-lm data folder (train.jsonl, valid.jsonl)."""
    train, valid = pydoc_records(max_chars)
    write_jsonl(train, Path(folder) / "train.jsonl")
    write_jsonl(valid, Path(folder) / "valid.jsonl")
    return Path(folder)


def read_jsonl(path):
    """Read a .jsonl file, naming the file and line of any malformed record."""
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            records.append(record)
    return records


def _check_records(records, path):
    """Check every record is in one mlx-lm format; fail with the line that is not."""
    for i, r in enumerate(records, 1):
        if "messages" in r:
            msgs = r["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in msgs
            )
        elif "prompt" in r or "completion" in r:
            ok = isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)
        elif "text" in r:
            ok = isinstance(r["text"], str) and r["text"] != ""
        else:
            ok = False
        if not ok:
            raise DataError(
                f"{path}: record {i} is not an mlx-lm record: it needs `messages` (a list of "
                "{role, content}), `prompt` and `completion` strings, or a non-empty `text`"
            )


def load_records(data=None, max_chars=DEFAULT_MAX_CHARS):
    """(train, valid) records: the embedded set when data is None, else a data folder."""
    if data is None:
        return pydoc_records(max_chars)
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(
            f"data folder not found: {folder} (it must hold train.jsonl and valid.jsonl "
            "in mlx-lm's format; leave --data out for the embedded Python-docs set)"
        )
    train_path, valid_path = folder / "train.jsonl", folder / "valid.jsonl"
    if not train_path.is_file():
        raise DataError(f"{train_path} is missing: a data folder needs train.jsonl")
    train = read_jsonl(train_path)
    if not train:
        raise DataError(f"{train_path} holds no records")
    _check_records(train, train_path)
    valid = read_jsonl(valid_path) if valid_path.is_file() else []
    _check_records(valid, valid_path)
    return train, valid


def load_datasets(tokenizer, data=None, max_chars=DEFAULT_MAX_CHARS, mask_prompt=False):
    """(train, valid) as mlx-lm `CacheDataset`s, tokenized lazily by mlx-lm's own code."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    config = types.SimpleNamespace(mask_prompt=mask_prompt)
    train, valid = load_records(data, max_chars)
    train_set = CacheDataset(create_dataset(train, tokenizer, config))
    valid_set = CacheDataset(create_dataset(valid, tokenizer, config)) if valid else None
    return train_set, valid_set


def packed_rows(dataset, *, rows, length, seed=0):
    """`rows` x `length` int32 tokens (numpy): the examples of a tokenized dataset (mlx-lm's
    `CacheDataset` or a list of (tokens, offset)) in a seeded order, concatenated and cut into
    rows; when the set holds fewer tokens, the stream repeats. Examples are tokenized only
    until there are enough tokens."""
    import numpy as np

    if rows < 1 or length < 2:
        raise DataError(f"need at least 1 row of 2 tokens, not {rows} x {length}")
    need = rows * length
    stream, total = [], 0
    for index in np.random.default_rng(seed).permutation(len(dataset)):
        tokens = dataset[int(index)][0]
        stream.append(np.asarray(tokens, dtype=np.int32))
        total += len(tokens)
        if total >= need:
            break
    if total == 0:
        raise DataError("the training set holds no tokens")
    return np.resize(np.concatenate(stream), need).reshape(rows, length)


def fixed_batches(dataset, *, batch_size, seq_len, count, seed=0):
    """`count` batches in mlx-lm's format (tokens [batch_size, seq_len + 1], lengths
    [batch_size, 2]), numpy, every one the same shape: packed rows (`packed_rows`), so
    mlx-lm's loss trains on all seq_len targets of every row and a compiled step never
    sees a new shape."""
    import numpy as np

    tokens = packed_rows(dataset, rows=batch_size * count, length=seq_len + 1, seed=seed)
    lengths = np.tile(np.array([[0, seq_len + 1]], dtype=np.int32), (batch_size, 1))
    return [(tokens[i * batch_size:(i + 1) * batch_size], lengths) for i in range(count)]
