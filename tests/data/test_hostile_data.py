"""Hostile data files: each ends in a DataError naming the file and line and the fix, or in a stated behaviour.

Covered: bytes that are not UTF-8 (and a BOM, which is skipped), a 100 MB line (generated in
the test's temporary folder, refused after reading 16 MiB of it), JSON nested 100,000 deep
(and 900 deep, past the recursive checks but not the parser), messages far beyond max_len
(truncated; a chat left without an assistant token is dropped and counted; the first
tokens are those of the whole text), empty files, records and contents, unknown roles, and
a data file that changes between a run and its resume (refused, naming the file).
"""

import json
import subprocess
import sys
import time

import pytest

from qzo.data.dataset import ChatDataset, _first_tokens, read_examples
from qzo.data.sources import MAX_LINE_BYTES
from qzo.errors import DataError
from qzo.train.loop import train

from helpers import run_overrides, write_code_chats

CHAT = {"messages": [{"role": "user", "content": "Code?"}, {"role": "assistant", "content": "CODE"}]}


def _file(tmp_path, data: bytes, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _line(record) -> bytes:
    return (json.dumps(record) + "\n").encode()


def test_bytes_that_are_not_utf8_name_the_line_the_byte_and_the_fix(tmp_path):
    bad = _line(CHAT) + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    with pytest.raises(DataError, match=r"data.jsonl:2: byte 47 of the line \(0xe9\) is not UTF-8.*iconv -f latin1"):
        read_examples(_file(tmp_path, bad))


def test_a_utf8_bom_is_skipped(tmp_path):
    examples = read_examples(_file(tmp_path, b"\xef\xbb\xbf" + _line(CHAT)))
    assert examples[0].messages[-1]["content"] == "CODE"


def test_a_100_mb_line_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(_line(CHAT))
        f.write(b'{"messages": [{"role": "user", "content": "')
        for _ in range(100):
            f.write(b"x" * (1 << 20))
        f.write(b'"}, {"role": "assistant", "content": "A"}]}\n')
    assert path.stat().st_size > 100 * 2**20
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"huge.jsonl:2: the line is longer than 16 MiB.*split a long text"):
        read_examples(path)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("depth", [100_000, 900])
def test_deeply_nested_json_names_the_line(tmp_path, depth):
    nested = "[" * depth + "]" * depth
    line = f'{{"messages": [{{"role": "tool", "content": {nested}}}, {{"role": "assistant", "content": "A"}}]}}\n'
    with pytest.raises(DataError, match=r"data.jsonl:2: .*nested deeper than .*flatten"):
        read_examples(_file(tmp_path, _line(CHAT) + line.encode()))


def test_messages_far_beyond_max_len_are_truncated_or_dropped_quickly(tmp_path, tiny_tokenizer):
    long = " ".join(f"word{i % 97}" for i in range(600_000))  # 4.6 MB of text
    records = [CHAT,
               {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "A"}]},
               {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": long}]}]
    path = _file(tmp_path, b"".join(_line(r) for r in records))
    start = time.perf_counter()
    ds = ChatDataset.from_source(tiny_tokenizer, path, max_len=64)
    assert time.perf_counter() - start < 10  # tokenizing the whole 4.6 MB twice took ~30 s here
    assert ds.dropped == 1 and len(ds) == 2  # the reply after the long prompt is past max_len
    assert len(ds.input_ids[1]) == 64 and sum(label != -100 for label in ds.labels[1]) > 20  # the long reply, cut
    only_long = _file(tmp_path, _line(records[1]), "long.jsonl")
    with pytest.raises(DataError, match="every example lost all trained tokens .* raise train.max_len"):
        ChatDataset.from_source(tiny_tokenizer, only_long, max_len=64)


@pytest.mark.parametrize("text", ["word " * 5000, "a" * 20000, "<|im_start|>x " * 3000, "é😀 \n\n  x" * 2000])
@pytest.mark.parametrize("max_len", [2, 63, 700])
def test_the_first_tokens_of_a_long_text_are_those_of_the_whole_text(tiny_tokenizer, text, max_len):
    whole = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = _first_tokens(tiny_tokenizer, text, max_len)
    assert ids == whole["input_ids"][:max_len] and offsets == whole["offset_mapping"][:max_len]


@pytest.mark.parametrize("data, match", [
    (b"", "is empty; it needs one JSON record per line"),
    (b"\n  \n\n", "is empty; it needs one JSON record per line"),
    (b"{}\n", "data.jsonl:1: expected an object with"),
    (b'{"messages": []}\n', 'data.jsonl:1: "messages" must be a non-empty list'),
    (b'{"text": "  "}\n', 'data.jsonl:1: "text" is empty'),
    (b'{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}\n',
     r"data.jsonl:1: message 1 \(assistant\) is empty: there is no reply to train on; fill it in or drop"),
    (b'{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant"}]}\n',
     r'data.jsonl:1: message 1 \(assistant\) needs a string "content"'),
    (b'{"messages": [{"role": "narrator", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n',
     r"data.jsonl:1: message 0 needs a \"role\" \(roles are system, user, assistant, tool"
     r".*data.fields.roles.*'narrator'"),
    (b'{"conversations": [{"from": "wizard", "value": "Q"}, {"from": "gpt", "value": "A"}]}\n',
     r"data.jsonl:1: turn 0 has \"from\" 'wizard'; ShareGPT roles are .*data.fields.roles"),
    (b'[1, 2]\n', "data.jsonl:1: expected a JSON object, got list"),
    (b'{"messages": [{"role": "user", "content": "Q"}\n', "data.jsonl:1: not valid JSON"),
])
def test_empty_and_odd_contents_name_the_line(tmp_path, data, match):
    with pytest.raises(DataError, match=match):
        read_examples(_file(tmp_path, data))


def test_an_empty_user_turn_is_a_chat(tmp_path):
    data = _line({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "A"}]})
    assert read_examples(_file(tmp_path, data))[0].messages[0]["content"] == ""


def test_the_cli_prints_one_error_line_not_a_traceback(tmp_path, tiny_model_dir):
    bad = _file(tmp_path, _line(CHAT) + b"\xff\xfe\n")
    result = subprocess.run([sys.executable, "-m", "qzo", "train", "--no-progress"]
                            + [a for s in run_overrides(tiny_model_dir, bad, tmp_path / "run") for a in ("--set", s)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: byte 1 of the line (0xff)")


def test_a_data_file_changed_before_the_resume_is_refused(tmp_path, tiny_model_dir):
    data = write_code_chats(tmp_path)
    out = tmp_path / "run"
    train(None, run_overrides(tiny_model_dir, data, out, **{"train.steps": 3}), progress=False, log=lambda *_: None)
    recorded = json.loads((out / "data.json").read_text())
    assert recorded["train"]["rows"] == 8 and recorded["train"]["file_sha256"]
    data.write_text(data.read_text().replace("CODE", "KODE", 1))
    with pytest.raises(DataError, match=r"data.train '.*chats.jsonl' is not the data this run started with: its file "
                                        r"changed .*Put the original file back, or start a new run .*lora.init_from="):
        train(None, ["train.steps=6"], resume=out, progress=False, log=lambda *_: None)
    data.write_text(data.read_text().replace("KODE", "CODE", 1))  # put back: the resume goes on
    assert train(None, ["train.steps=6"], resume=out, progress=False, log=lambda *_: None)["steps"] == 6


def test_a_run_from_before_data_json_resumes_and_records_it(tmp_path, tiny_model_dir):
    data = write_code_chats(tmp_path)
    out = tmp_path / "run"
    train(None, run_overrides(tiny_model_dir, data, out, **{"train.steps": 3}), progress=False, log=lambda *_: None)
    (out / "data.json").unlink()
    train(None, ["train.steps=4"], resume=out, progress=False, log=lambda *_: None)
    assert json.loads((out / "data.json").read_text())["eval"]["rows"] == 8


def test_the_line_limit_is_stated():
    assert MAX_LINE_BYTES == 16 << 20
