"""Fine-tuning data: the embedded Python-docs set and users' mlx-lm data folders."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.trainer import iterate_batches

from kernel_lab import data
from kernel_lab.training import train_once


def test_embedded_records_are_well_formed_and_deterministic():
    train, valid = data.pydoc_records(max_chars=800)
    again_train, again_valid = data.pydoc_records(max_chars=800)
    assert (train, valid) == (again_train, again_valid)
    assert len(train) > 10 * len(valid) > 0
    for record in train + valid:
        user, assistant = record["messages"]
        assert user["role"] == "user" and user["content"].startswith("Explain ")
        assert assistant["role"] == "assistant" and 0 < len(assistant["content"]) <= 800
    # the split is by topic: no question (topic heading) is on both sides
    topic = lambda r: r["messages"][0]["content"].split(" (part ")[0]  # noqa: E731
    assert not {topic(r) for r in train} & {topic(r) for r in valid}


def test_with_statement_example():
    train, valid = data.pydoc_records()
    questions = [r["messages"][0]["content"] for r in train + valid]
    assert any(q.startswith("Explain Python's `with` statement.") for q in questions)


def test_longer_chunks_mean_fewer_examples():
    assert len(data.pydoc_records(4000)[0]) < len(data.pydoc_records(1000)[0])
    with pytest.raises(data.DataError, match="too small"):
        data.pydoc_records(max_chars=10)


def _write(folder, name, lines):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no records"),
        (['{"text": "fine"}', '{"text": "broken"'], r"train.jsonl:2: not valid JSON"),
        (['["a list"]'], "must be a JSON object"),
        (['{"question": "no known key"}'], "record 1 is not an mlx-lm record"),
        (['{"messages": [{"content": "no role"}]}'], "record 1 is not an mlx-lm record"),
    ],
    ids=["empty", "malformed-line", "not-an-object", "unknown-format", "bad-messages"],
)
def test_bad_data_folders_are_named(tmp_path, lines, message):
    _write(tmp_path / "d", "train.jsonl", lines)
    with pytest.raises(data.DataError, match=message):
        data.load_records(tmp_path / "d")


def test_missing_folder_and_train_file(tmp_path):
    with pytest.raises(data.DataError, match="data folder not found"):
        data.load_records(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="train.jsonl is missing"):
        data.load_records(tmp_path / "empty")


def test_export_round_trips(tmp_path):
    folder = data.export_pydoc(tmp_path / "pydoc", max_chars=1200)
    assert data.load_records(folder) == data.pydoc_records(1200)


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
     "<|im_start|>assistant\nHello!"),
    ({"prompt": "2 + 2 =", "completion": "four"}, "four"),
    ({"text": "def add(a, b):\n    return a + b\n"}, "return a + b"),
], ids=["messages", "prompt-completion", "text"])
def test_user_folder_batches(tmp_path, embedded_model, record, expected):
    _, tokenizer = embedded_model
    _write(tmp_path / "d", "train.jsonl", [json.dumps(record)] * 4)
    _write(tmp_path / "d", "valid.jsonl", [json.dumps(record)] * 2)
    train, valid = data.load_datasets(tokenizer, data=tmp_path / "d")
    assert len(train) == 4 and len(valid) == 2
    tokens, offset = train[0]
    assert offset == 0 and all(isinstance(t, int) for t in tokens) and len(tokens) > 2
    assert expected in tokenizer.decode(tokens)


def test_embedded_batches_are_well_formed_and_deterministic(embedded_model):
    _, tokenizer = embedded_model
    train, valid = data.load_datasets(tokenizer)
    assert valid is not None and len(train) > len(valid)

    def first_batches(seed):
        return [(np.array(b), np.array(lengths))
                for (b, lengths), _ in zip(iterate_batches(train, 4, 64, seed=seed), range(3))]

    one, two = first_batches(7), first_batches(7)
    for (b1, l1), (b2, l2) in zip(one, two):
        np.testing.assert_array_equal(b1, b2)
        np.testing.assert_array_equal(l1, l2)
    batch, lengths = next(iterate_batches(train, 4, 64, seed=7))
    assert batch.dtype == mx.int32 and batch.shape[0] == 4 and batch.shape[1] <= 64
    assert lengths.shape == (4, 2) and (np.array(lengths)[:, 1] <= 64).all()
    # every sequence starts with the chat template's first token and is not all padding
    assert (np.array(batch)[:, 0] == np.array(batch)[0, 0]).all()
    assert (np.array(batch) != 0).sum(axis=1).min() > 8


@pytest.mark.slow
def test_a_few_lora_steps_reduce_the_loss(tmp_path):
    """Real model, real trainer: the same short example 6 times, the loss must fall."""
    record = {"messages": [{"role": "user", "content": "What does `pass` do in Python?"},
                           {"role": "assistant", "content": "It does nothing: a placeholder."}]}
    _write(tmp_path / "d", "train.jsonl", [json.dumps(record)] * 2)
    run = train_once(program=None, data=str(tmp_path / "d"), iters=6, batch_size=1,
                     max_seq_length=48, num_layers=4, learning_rate=2e-4, steps_per_report=1)
    assert run["ok"], run.get("error")
    losses = run["losses"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------- fixed-shape batches (stage 3)


def test_packed_batches_all_have_one_shape_and_train_on_every_target():
    from mlx_lm.tuner.trainer import default_loss

    from kernel_lab.tiny_models import random_token_dataset, tiny_model

    dataset = random_token_dataset(8, 40)  # 8 examples of 36..40 tokens: 307 in all
    batches = data.fixed_batches(dataset, batch_size=2, seq_len=31, count=7, seed=3)
    assert len(batches) == 7 and {b.shape for b, _ in batches} == {(2, 32)}
    assert all(b.dtype == np.int32 for b, _ in batches)
    tokens, lengths = batches[0]
    assert lengths.tolist() == [[0, 32], [0, 32]]
    # mlx-lm's own loss masks nothing out: 2 x 31 targets
    _, ntoks = default_loss(tiny_model("llama"), mx.array(tokens), mx.array(lengths))
    assert ntoks.item() == 62
    # the stream is the examples in a seeded order, concatenated, repeated past the end (448 > 307)
    stream = np.concatenate([b.reshape(-1) for b, _ in batches])
    order = np.random.default_rng(3).permutation(8)
    expected = np.concatenate([dataset[i][0] for i in order])
    assert len(expected) == 307
    np.testing.assert_array_equal(stream[:307], expected)
    np.testing.assert_array_equal(stream[307:], expected[:448 - 307])
    again = data.fixed_batches(dataset, batch_size=2, seq_len=31, count=7, seed=3)
    assert all((a == b).all() for (a, _), (b, _) in zip(batches, again))
    other = data.fixed_batches(dataset, batch_size=2, seq_len=31, count=7, seed=4)
    assert not all((a == b).all() for (a, _), (b, _) in zip(batches, other))


def test_packing_tokenizes_only_what_it_needs_and_refuses_nonsense():
    calls = []

    class Lazy(list):
        def __getitem__(self, i):
            calls.append(i)
            return super().__getitem__(i)

    dataset = Lazy([([1] * 100, 0)] * 50)
    data.packed_rows(dataset, rows=2, length=101)
    assert len(calls) == 3  # 300 tokens cover 202
    with pytest.raises(data.DataError, match="at least 1 row"):
        data.packed_rows(dataset, rows=0, length=8)
    with pytest.raises(data.DataError, match="no tokens"):
        data.packed_rows([([], 0)], rows=1, length=8)
