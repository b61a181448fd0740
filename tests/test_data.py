"""Chat data: assistant-only labels, truncation, batching, held-out split, and clear errors."""

import json

import pytest
import torch

from qzo.data import IGNORE, Batcher, ChatDataset, collate, encode_chat, read_chat_jsonl
from qzo.errors import DataError

CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "ANSWER: red"},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "ANSWER: blue"},
]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_labels_cover_exactly_the_assistant_turns(smol_tokenizer):
    ids, labels = encode_chat(smol_tokenizer, CHAT, max_len=256)
    assert len(ids) == len(labels)
    trained = [t for t, y in zip(ids, labels) if y != IGNORE]
    text = smol_tokenizer.decode(trained)
    assert text == "ANSWER: red<|im_end|>\nANSWER: blue<|im_end|>\n"
    masked = smol_tokenizer.decode([t for t, y in zip(ids, labels) if y == IGNORE])
    assert "Name a colour." in masked and "assistant" in masked and "ANSWER" not in masked


def test_truncation_keeps_prefix_and_drops_examples_without_targets(smol_tokenizer):
    ids, labels = encode_chat(smol_tokenizer, CHAT, max_len=40)
    assert len(ids) == 40
    assert encode_chat(smol_tokenizer, CHAT, max_len=5) is None
    with pytest.raises(DataError, match="max_len"):
        ChatDataset.from_chats(smol_tokenizer, [CHAT], max_len=5)


def test_collate_pads_and_masks():
    batch = collate([[1, 2, 3], [4]], [[IGNORE, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_batches_are_a_function_of_seed_and_step():
    ds = ChatDataset([[i] for i in range(10)], [[i] for i in range(10)])
    a, b = Batcher(ds, 4, seed=1, pad_id=0), Batcher(ds, 4, seed=1, pad_id=0)
    seen = [a.batch(s)["input_ids"].flatten().tolist() for s in (1, 2, 3)]
    assert [b.batch(s)["input_ids"].flatten().tolist() for s in (3, 1, 2)] == [seen[2], seen[0], seen[1]]
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))  # first epoch is a permutation
    assert Batcher(ds, 4, seed=2, pad_id=0).batch(1)["input_ids"].flatten().tolist() != seen[0]


def test_split_is_deterministic_and_disjoint():
    ds = ChatDataset([[i] for i in range(20)], [[i] for i in range(20)])
    train, held = ds.split(0.25, seed=0)
    assert len(held) == 5 and len(train) == 15
    assert not {x[0] for x in train.input_ids} & {x[0] for x in held.input_ids}
    assert ds.split(0.25, seed=0)[1].input_ids == held.input_ids
    with pytest.raises(DataError, match="eval_fraction"):
        ds.split(1.5, seed=0)


def test_builtin_demo_data_reads():
    train, held = read_chat_jsonl("builtin:demo_train"), read_chat_jsonl("builtin:demo_eval")
    assert len(train) >= 300 and len(held) >= 40
    assert all(m[-1]["content"].endswith("#qzo") for m in train)


@pytest.mark.parametrize(
    "lines,match",
    [
        ([], "is empty"),
        (["", "   "], "is empty"),
        ([json.dumps({"messages": CHAT}), "{not json"], r":2: not valid JSON"),
        ([json.dumps({"text": "hi"})], r":1: expected an object"),
        ([json.dumps({"messages": [{"role": "bot", "content": "x"}]})], r":1: message 0 needs"),
        ([json.dumps({"messages": [{"role": "user", "content": "hi"}]})], r":1: the chat has no assistant turn"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, lines, match):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=match) as info:
        read_chat_jsonl(path)
    assert "bad.jsonl" in str(info.value)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="builtin:demo_train"):
        read_chat_jsonl("builtin:wiki")
