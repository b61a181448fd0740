"""Datasets by name: ``hf:NAME[:CONFIG][:SPLIT]`` through ``datasets.load_dataset``, on a dataset folder
in hub layout (data/<split>-*.parquet, a README whose YAML header declares configs), with no
network: a hub name is tried in offline mode, where a dataset missing from the cache is a clear error."""

import pytest

from qzo.data.dataset import ChatDataset, datasets_from_config, read_examples
from qzo.data.sources import parse_hf
from qzo.errors import DataError

datasets = pytest.importorskip("datasets")

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: sharegpt
  data_files:
  - split: train
    path: sharegpt/train-*.parquet
---
# A tiny chat dataset in hub layout
"""


def _chat(i):
    return {"messages": [{"role": "user", "content": f"Code {i}?"}, {"role": "assistant", "content": f"CODE {i}"}]}


@pytest.fixture
def hub_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "org--chats"
    (folder / "data").mkdir(parents=True)
    (folder / "sharegpt").mkdir()
    (folder / "README.md").write_text(README)
    for split, ids in (("train", range(6)), ("test", range(6, 8))):  # parquet, as the hub converts datasets to
        datasets.Dataset.from_list([_chat(i) for i in ids]).to_parquet(str(folder / "data" / f"{split}-00000.parquet"))
    rows = [{"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]}
            for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "sharegpt" / "train-00000-of-00001.parquet"))
    return folder


def _answers(examples):
    return [e.messages[-1]["content"] for e in examples]


def test_a_hub_layout_folder_by_name_split_and_config(hub_folder, tiny_tokenizer):
    assert _answers(read_examples(f"hf:{hub_folder}")) == [f"CODE {i}" for i in range(6)]  # split train
    assert _answers(read_examples(f"hf:{hub_folder}:test")) == ["CODE 6", "CODE 7"]
    assert _answers(read_examples(f"hf:{hub_folder}:train[:2]")) == ["CODE 0", "CODE 1"]  # a slice, colon and all
    assert _answers(read_examples(f"hf:{hub_folder}:sharegpt:train")) == ["A0", "A1", "A2"]
    examples = read_examples(f"hf:{hub_folder}:test")
    assert examples[1].where == f"hf:{hub_folder}:test row 1"
    cfg = {"data": {"train": f"hf:{hub_folder}", "eval": f"hf:{hub_folder}:test", "eval_fraction": 0.1},
           "train": {"max_len": 64, "seed": 0}}
    train, held = datasets_from_config(cfg, tiny_tokenizer)
    assert (len(train), len(held)) == (6, 2)
    assert held.input_ids == ChatDataset.from_chats(tiny_tokenizer, [_chat(i)["messages"] for i in (6, 7)],
                                                    64).input_ids
    with pytest.raises(DataError, match=r"could not load .*split 'validation'.* as the local folder: .*validation"):
        read_examples(f"hf:{hub_folder}:validation")
    with pytest.raises(DataError, match=r"could not load .*config nope.*: .*nope"):
        read_examples(f"hf:{hub_folder}:nope:train")


def test_a_hub_dataset_downloaded_before_loads_from_the_cache_offline(tmp_path, monkeypatch):
    """What ``load_dataset("org/name")`` leaves in the datasets cache (``org___name/CONFIG/VERSION/HASH/``
    with ``name-SPLIT.arrow``), made here by preparing a local parquet file and moving it into place."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    parquet = tmp_path / "x.parquet"
    datasets.Dataset.from_list([_chat(i) for i in range(3)]).to_parquet(str(parquet))
    builder = datasets.load_dataset_builder("parquet", data_files={"train": str(parquet)}, cache_dir=str(cache))
    builder.download_and_prepare()
    prepared = cache / "qzo-tests___cached-chats" / "default" / "0.0.0" / ("0" * 8)
    shutil.copytree(builder.cache_dir, prepared)
    (prepared / "parquet-train.arrow").rename(prepared / "cached-chats-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in tests: never ask the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _answers(read_examples("hf:qzo-tests/cached-chats")) == ["CODE 0", "CODE 1", "CODE 2"]


def test_a_hub_name_not_in_the_cache_is_a_clear_error_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in tests: never ask the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'hf:qzo-tests/no-such-set:train': datasets could not load "
                                        r"'qzo-tests/no-such-set' \(config None, split 'train'\) as a hub dataset "
                                        r"\(it needs the network, or an earlier download in the datasets cache"):
        read_examples("hf:qzo-tests/no-such-set:train")


@pytest.mark.parametrize("spec,want", [
    ("hf:org/name", {"name": "org/name", "config": None, "split": "train"}),
    ("hf:org/name:test", {"name": "org/name", "config": None, "split": "test"}),
    ("hf:org/name:en:validation[:10%]", {"name": "org/name", "config": "en", "split": "validation[:10%]"}),
    ("hf:json:data/*.jsonl", {"kind": "json", "path": "data/*.jsonl"}),
    ("hf:parquet:x.parquet", {"kind": "parquet", "path": "x.parquet"}),
])
def test_parse_hf(spec, want):
    assert parse_hf(spec) == want


@pytest.mark.parametrize("spec", ["hf:", "hf:org/name:a:b:c", "hf:org/name::train", "hf:json"])
def test_bad_hf_specs_show_the_syntax(spec):
    with pytest.raises(DataError, match=r"expected hf:KIND:PATH .*hf:NAME:CONFIG:SPLIT"):
        parse_hf(spec)


def test_a_folder_given_as_a_jsonl_path_points_to_hf(hub_folder):
    with pytest.raises(DataError, match=r"does not exist \(a dataset folder or hub id is read with hf:NAME\)"):
        read_examples(str(hub_folder))


def test_a_bad_hf_spec_is_a_config_error_before_anything_loads():
    from qzo.config.schema import load_config
    from qzo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config key 'data.eval': 'hf:org/x:a:b:c': expected hf:KIND:PATH"):
        load_config(None, ["data.eval=hf:org/x:a:b:c"])
    assert load_config(None, ["data.train=hf:org/x:en:train[:10]"])["data"]["train"] == "hf:org/x:en:train[:10]"
