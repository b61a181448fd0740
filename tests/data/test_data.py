"""Training data: chat/Alpaca/completion records, assistant-only labels, system prompts, truncation,
packing, batching, held-out split, the Hugging Face datasets input, and clear errors."""

import copy
import json
import sys

import pytest

from qzo.config.schema import DEFAULTS, load_config
from qzo.data.dataset import (
                              IGNORE, Batcher, ChatDataset, collate, datasets_from_config, encode_chat, eval_batches, read_chat_jsonl, read_chats,
                              read_hf, to_chat,
                              )
from qzo.errors import ConfigError, DataError

CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "ANSWER: red"},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "ANSWER: blue"},
]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_labels_cover_exactly_the_assistant_turns(tiny_tokenizer):
    ids, labels = encode_chat(tiny_tokenizer, CHAT, max_len=256)
    assert len(ids) == len(labels)
    trained = [t for t, y in zip(ids, labels) if y != IGNORE]
    text = tiny_tokenizer.decode(trained)
    assert text == "ANSWER: red<|im_end|>\nANSWER: blue<|im_end|>\n"
    masked = tiny_tokenizer.decode([t for t, y in zip(ids, labels) if y == IGNORE])
    assert "Name a colour." in masked and "assistant" in masked and "ANSWER" not in masked


def test_truncation_keeps_prefix_and_drops_examples_without_targets(tiny_tokenizer):
    ids, labels = encode_chat(tiny_tokenizer, CHAT, max_len=40)
    assert len(ids) == 40
    assert encode_chat(tiny_tokenizer, CHAT, max_len=5) is None
    with pytest.raises(DataError, match="max_len"):
        ChatDataset.from_chats(tiny_tokenizer, [CHAT], max_len=5)


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
        ([json.dumps({"body": "hi"})], r":1: expected an object"),
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


# --- formats, system prompt, packing, datasets, config -------------------------------------

ALPACA = {"instruction": "Name a colour.", "input": "Pick a warm one.", "output": "ANSWER: red"}
COMPLETION = {"prompt": "What is 2 plus 2?", "completion": "ANSWER: 4"}
END = "<|im_end|>\n"  # SmolLM2's end of turn: trained on with the assistant's content


def _trained(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])


def _masked(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels) if y == IGNORE])


def test_alpaca_record_is_a_user_and_an_assistant_turn(tiny_tokenizer):
    chat = to_chat(ALPACA)
    assert chat == [{"role": "user", "content": "Name a colour.\n\nPick a warm one."},
                    {"role": "assistant", "content": "ANSWER: red"}]
    ids, labels = encode_chat(tiny_tokenizer, chat, max_len=256)
    assert _trained(tiny_tokenizer, ids, labels) == "ANSWER: red" + END
    assert "Name a colour.\n\nPick a warm one." in _masked(tiny_tokenizer, ids, labels)
    without = {k: v for k, v in ALPACA.items() if k != "input"}
    for no_input in ({**ALPACA, "input": ""}, {**ALPACA, "input": None}, without):
        assert to_chat(no_input)[0]["content"] == "Name a colour."


def test_completion_record_trains_on_the_completion_only(tiny_tokenizer):
    chat = to_chat(COMPLETION)
    assert chat == [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "ANSWER: 4"}]
    ids, labels = encode_chat(tiny_tokenizer, chat, max_len=256)
    assert _trained(tiny_tokenizer, ids, labels) == "ANSWER: 4" + END
    masked = _masked(tiny_tokenizer, ids, labels)
    assert "What is 2 plus 2?" in masked and "<|im_start|>assistant\n" in masked and "ANSWER" not in masked


def test_detection_order_and_forced_format():
    both = {"messages": CHAT, "prompt": "p", "completion": "c"}
    assert to_chat(both) == CHAT  # messages wins
    assert to_chat(both, format="completion")[1]["content"] == "c"
    assert to_chat({**ALPACA, **COMPLETION})[1]["content"] == "ANSWER: red"  # alpaca before completion
    assert to_chat({"messages": None, **COMPLETION})[1]["content"] == "ANSWER: 4"  # null counts as absent
    with pytest.raises(DataError, match=r'"alpaca" expects "instruction" and "output".*fields: prompt, completion'):
        to_chat(COMPLETION, format="alpaca")
    with pytest.raises(DataError, match='data.format "chat" expects a non-empty "messages" list'):
        to_chat(ALPACA, format="chat")
    with pytest.raises(DataError, match="choose one of auto, chat, sharegpt, alpaca, completion, text"):
        to_chat(CHAT, format="vicuna")


def test_system_prompt_is_added_where_there_is_none(tiny_tokenizer):
    own = [{"role": "system", "content": "Answer in French."}] + CHAT
    assert to_chat({"messages": own}, system_prompt="Be terse.") == own
    for record in ({"messages": CHAT}, ALPACA, COMPLETION):
        chat = to_chat(record, system_prompt="Be terse.")
        assert chat[0] == {"role": "system", "content": "Be terse."} and chat[1:] == to_chat(record)
    ids, labels = encode_chat(tiny_tokenizer, to_chat(COMPLETION, system_prompt="Be terse."), max_len=256)
    masked = _masked(tiny_tokenizer, ids, labels)
    assert masked.startswith("<|im_start|>system\nBe terse." + END) and "SmolLM" not in masked
    assert _trained(tiny_tokenizer, ids, labels) == "ANSWER: 4" + END
    ids, labels = encode_chat(tiny_tokenizer, to_chat(COMPLETION), max_len=256)
    assert "SmolLM" in _masked(tiny_tokenizer, ids, labels)  # without one, the template's default stays


def _mixed_lines():
    return [json.dumps({"messages": CHAT}), json.dumps(ALPACA), "", json.dumps(COMPLETION),
            json.dumps({"instruction": "Say hi.", "output": "hi"})]


MIXED_TRAINED = ["ANSWER: red" + END + "ANSWER: blue" + END, "ANSWER: red" + END, "ANSWER: 4" + END, "hi" + END]


def test_mixed_format_file(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "mixed.jsonl", _mixed_lines())
    chats = read_chat_jsonl(path)
    assert [len(c) for c in chats] == [4, 2, 2, 2]
    ds = ChatDataset.from_jsonl(tiny_tokenizer, path, max_len=256)
    assert [_trained(tiny_tokenizer, x, y) for x, y in zip(ds.input_ids, ds.labels)] == MIXED_TRAINED
    with_system = read_chats(path, system_prompt="S.")
    assert all(c[0] == {"role": "system", "content": "S."} for c in with_system)
    with pytest.raises(DataError, match=r"mixed.jsonl:2: data.format \"chat\" expects"):
        read_chat_jsonl(path, format="chat")


@pytest.mark.parametrize(
    "line,fmt,match",
    [
        ({"body": "hi", "label": 1}, "auto",
         r':1: expected an object with a non-empty "messages" list, or a non-empty "conversations" list '
         r'\(ShareGPT\), or "instruction" and "output" strings \(and an optional "input"\), or "prompt" and '
         r'"completion" \(strings, or message lists\), or a "text" string; found fields: body, label '
         r'\(name yours with data.fields\)'),
        ({"instruction": "x"}, "auto", r":1: expected an object .*found fields: instruction"),
        ({"prompt": "x", "completion": 3}, "auto", r':1: "completion" must be a string in the completion format'),
        ({**ALPACA, "input": ["a"]}, "auto", r':1: "input" must be a string in the alpaca format'),
        ([1, 2], "auto", r":1: expected a JSON object, got list"),
        ({"messages": []}, "auto", r':1: "messages" must be a non-empty list of messages'),
        (ALPACA, "completion", r':1: data.format "completion" expects "prompt" and "completion"'),
    ],
)
def test_bad_records_name_file_line_and_expected_fields(tmp_path, line, fmt, match):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(line)])
    with pytest.raises(DataError, match=match) as info:
        read_chat_jsonl(path, format=fmt)
    assert "bad.jsonl" in str(info.value)


def _demo_dataset(tok, n, max_len):
    return ChatDataset.from_chats(tok, read_chat_jsonl("builtin:demo_train")[:n], max_len, source="demo")


def test_packed_rows_keep_exactly_the_labels_of_their_examples(tiny_tokenizer):
    max_len = 150  # demo chats are 56-72 tokens: two per row
    chats = read_chat_jsonl("builtin:demo_train")[:9] + [CHAT * 4]  # the last is truncated to max_len
    flat = ChatDataset.from_chats(tiny_tokenizer, chats, max_len, source="demo")
    assert len(flat.input_ids[-1]) == max_len
    packed = flat.pack(max_len)
    assert packed.row_len == max_len and packed.num_examples == len(flat) == 10 and len(packed) < len(flat)
    assert [sum(s) for s in packed.segments] == [len(x) for x in packed.input_ids]
    assert all(len(x) <= max_len for x in packed.input_ids) and packed.segments[-1] == [max_len]
    # next-fit: a row is closed only when the next example does not fit in it
    for row, nxt in zip(packed.segments, packed.segments[1:]):
        assert sum(row) + nxt[0] > max_len
    # rows are the examples laid end to end, in order, none split
    examples = iter(zip(flat.input_ids, flat.labels))
    for ids, labels, segs in zip(packed.input_ids, packed.labels, packed.segments):
        start, answers = 0, ""
        for n in segs:
            x, y = next(examples)
            assert ids[start : start + n] == x and labels[start : start + n] == y
            assert labels[start] == IGNORE  # no target crosses from one example into the next
            answers += _trained(tiny_tokenizer, x, y)
            start += n
        assert _trained(tiny_tokenizer, ids, labels) == answers
    assert next(examples, None) is None
    assert _trained(tiny_tokenizer, flat.input_ids[0], flat.labels[0]) == chats[0][1]["content"] + END


def test_packed_batches_are_exactly_max_len_wide(tiny_tokenizer):
    packed = _demo_dataset(tiny_tokenizer, 7, 150).pack(150)
    batcher = Batcher(packed, 3, seed=0, pad_id=tiny_tokenizer.pad_token_id)
    batch = batcher.batch(1)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 150)
    assert "attention_mask" not in batch  # packed: the block-diagonal mask comes from the position ids
    for j, i in enumerate(batcher.indices(1)):
        n, segs = len(packed.input_ids[i]), packed.segments[i]
        assert batch["input_ids"][j, :n].tolist() == packed.input_ids[i]
        assert batch["labels"][j, :n].tolist() == packed.labels[i] and (batch["labels"][j, n:] == IGNORE).all()
        # positions restart at 0 with every example, and once more for the padding
        assert batch["position_ids"][j].tolist() == [p for k in [*segs, 150 - n] for p in range(k)]
    assert next(iter(eval_batches(packed, 2, 0)))["input_ids"].shape == (2, 150)
    assert collate([[1]], [[1]], pad_id=0, width=4)["input_ids"].tolist() == [[1, 0, 0, 0]]


def test_pack_refuses_repacking_and_overlong_rows(tiny_tokenizer):
    packed = _demo_dataset(tiny_tokenizer, 3, 150).pack(150)
    with pytest.raises(DataError, match="already packed"):
        packed.pack(150)
    with pytest.raises(DataError, match="longer than max_len=40"):
        _demo_dataset(tiny_tokenizer, 3, 150).pack(40)
    train, held = packed.split(0.5, seed=0)
    assert train.row_len == held.row_len == 150
    assert train.num_examples + held.num_examples == 3


def _cfg(**data):
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data"].update(data)
    return cfg


def test_datasets_from_config_hold_every_demo_chat_with_labels_on_the_replies_only(tiny_tokenizer):
    train, held = datasets_from_config(_cfg(), tiny_tokenizer)
    for ds, name in ((train, "builtin:demo_train"), (held, "builtin:demo_eval")):
        chats = read_chat_jsonl(name)
        assert len(ds) + ds.dropped == len(chats) and ds.dropped == 0  # every demo chat fits train.max_len 96
        for ids, labels, chat in zip(ds.input_ids, ds.labels, chats):
            assert len(ids) == len(labels) <= 96
            assert all(y == IGNORE or y == t for t, y in zip(ids, labels))
            reply = chat[-1]["content"]
            assert tiny_tokenizer.decode([t for t, y in zip(ids, labels) if y != IGNORE]) == reply + END
            assert chat[0]["content"] in tiny_tokenizer.decode(ids)  # the prompt is there, untrained


def test_eval_fraction_holds_out_that_share_disjointly_and_by_seed(tmp_path, tiny_tokenizer):
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                      {"role": "assistant", "content": f"ANSWER: {i}"}]}) for i in range(20)]
    path = _write(tmp_path / "chats.jsonl", rows)
    splits = {}
    for seed in (3, 3, 4):
        cfg = _cfg(train=str(path), eval=None, eval_fraction=0.25)
        cfg["train"].update(max_len=64, seed=seed)
        train, held = datasets_from_config(cfg, tiny_tokenizer)
        assert (len(train), len(held)) == (15, 5)
        as_rows = lambda ds: sorted(map(tuple, ds.input_ids))  # noqa: E731
        assert not set(as_rows(train)) & set(as_rows(held))
        assert sorted(as_rows(train) + as_rows(held)) == sorted(as_rows(ChatDataset.from_jsonl(tiny_tokenizer,
                                                                                                  path, 64)))
        splits.setdefault(seed, []).append(as_rows(held))
    assert splits[3][0] == splits[3][1] and splits[3][0] != splits[4][0]  # the seed decides, nothing else

    old = _cfg(train=str(path), eval=None, eval_fraction=0.25)
    old["train"].update(max_len=64, seed=3)
    for key in ("format", "system_prompt", "packing"):  # a config written before these keys existed
        del old["data"][key]
    assert sorted(map(tuple, datasets_from_config(old, tiny_tokenizer)[1].input_ids)) == splits[3][0]


def test_datasets_from_config_new_keys(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "mixed.jsonl", _mixed_lines())
    cfg = load_config(None, [f"data.train={path}", f"data.eval={path}", "data.system_prompt=Be terse.",
                             "data.packing=true", "data.format=auto", "train.max_len=128"])
    train, held = datasets_from_config(cfg, tiny_tokenizer)
    assert train.row_len == 128 and train.num_examples == 4 and len(train) < 4
    assert held.row_len == 0 and held.segments is None and len(held) == 4  # held-out is never packed
    for x, y in zip(held.input_ids, held.labels):
        assert tiny_tokenizer.decode(x).startswith("<|im_start|>system\nBe terse.")
    assert _trained(tiny_tokenizer, [t for x in held.input_ids for t in x], [t for y in held.labels for t in y]) \
        == _trained(tiny_tokenizer, [t for x in train.input_ids for t in x], [t for y in train.labels for t in y]) \
        == "".join(MIXED_TRAINED)
    with pytest.raises(DataError, match=r"mixed.jsonl:1: data.format \"completion\" expects.*found fields: messages"):
        datasets_from_config(load_config(None, [f"data.train={path}", "data.format=completion"]), tiny_tokenizer)


def test_config_keys_validate():
    cfg = load_config(None)
    assert (cfg["data"]["format"], cfg["data"]["system_prompt"], cfg["data"]["packing"]) == ("auto", None, False)
    assert load_config(None, ["data.system_prompt=You are terse."])["data"]["system_prompt"] == "You are terse."
    with pytest.raises(ConfigError, match="data.format.*choose one of auto, chat, sharegpt, alpaca, completion, text"):
        load_config(None, ["data.format=vicuna"])
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(None, ["data.packing=3"])


def test_hf_datasets_input(tmp_path, tiny_tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    jsonl = _write(tmp_path / "mixed.jsonl", _mixed_lines())
    assert read_hf(f"hf:json:{jsonl}") == read_chat_jsonl(jsonl)
    records = [{"messages": CHAT}, ALPACA, COMPLETION, {"instruction": "Say hi.", "output": "hi"}]
    columns = ["messages", "instruction", "input", "output", "prompt", "completion"]
    parquet = tmp_path / "mixed.parquet"  # a table has every column: a row's missing fields are nulls
    datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in records]).to_parquet(str(parquet))
    chats = read_chats(f"hf:parquet:{parquet}", system_prompt="S.")
    assert chats == read_chat_jsonl(jsonl, system_prompt="S.")
    cfg = _cfg(train=f"hf:parquet:{parquet}", eval=f"hf:json:{jsonl}")
    cfg["train"]["max_len"] = 256
    train, held = datasets_from_config(cfg, tiny_tokenizer)
    assert [_trained(tiny_tokenizer, x, y) for x, y in zip(train.input_ids, train.labels)] == MIXED_TRAINED
    assert train.input_ids == held.input_ids
    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([{**COMPLETION, "body": None}, {"prompt": None, "completion": None, "body": "hi"}]) \
        .to_parquet(str(bad))
    with pytest.raises(DataError, match=r"hf:parquet:.*bad.parquet row 1: expected an object .*found fields: body"):
        read_hf(f"hf:parquet:{bad}")


def test_hf_spec_errors(tmp_path, monkeypatch):
    path = _write(tmp_path / "d.jsonl", [json.dumps(COMPLETION)])
    with pytest.raises(DataError, match="expected hf:KIND:PATH"):
        read_chats("hf:json")
    with pytest.raises(DataError, match=r"at most hf:NAME:CONFIG:SPLIT|expected hf:KIND:PATH.*hf:NAME:CONFIG:SPLIT"):
        read_chats("hf:org/name:a:b:c")
    with pytest.raises(DataError, match="no local file matches"):
        read_chats(f"hf:json:{tmp_path / 'nope.jsonl'}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match="pip install datasets"):
        read_chats(f"hf:json:{path}")
