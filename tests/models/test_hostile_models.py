"""Broken model files give one clear error naming the file, never a traceback; pickles are never read."""

import os
import shutil

import pytest
import torch

import qzo
from qzo.errors import ModelSourceError


@pytest.fixture
def broken(tiny_model_dir, tmp_path):
    def make(name):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        return folder

    return make


def test_a_truncated_safetensors_file(broken):
    folder = broken("truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelSourceError, match="weights file in .*truncated.* is damaged"):
        qzo.load(folder, "nf4")


def test_a_folder_with_a_config_but_no_weights(broken):
    folder = broken("noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="could not load a model from .*noweights"):
        qzo.load(folder, "nf4")


def test_pickled_weights_are_refused_unread(broken):
    folder = broken("pickled")
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="only pickled PyTorch weights"):
        qzo.load(folder, "nf4")


def test_gguf_with_a_corrupt_header_or_no_magic(tmp_path, monkeypatch):
    monkeypatch.setenv("QZO_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ModelSourceError, match="could not read GGUF"):
        qzo.load(bad, "nf4")
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-converted was left in the cache
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        qzo.load(fake, "nf4")


def _small_gguf(path):
    """A well-formed two-tensor llama GGUF (no tokenizer, which qzo reads after the tensor table)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["tensor table", "tensor data cut"])
def test_gguf_with_a_corrupt_tensor_table_or_cut_data(damage, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("QZO_CACHE", str(tmp_path / "cache"))
    data = _small_gguf(tmp_path / "good.gguf")
    if damage == "tensor table":  # the second tensor's dims, type and offset: garbage
        at = data.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight")
        data = data[:at] + b"\xff" * 24 + data[at + 24:]
    else:
        data = data[:-100]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelSourceError, match=f"could not read GGUF '{bad}'"):
        qzo.load(bad, "nf4")
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_a_conversion_that_loses_the_race_keeps_the_folder_already_published(tmp_path):
    """Two processes converting the same GGUF at once (two runs on a fresh cache, parallel test workers): the later
    one must not remove the folder the first one published, which a process may already be loading from."""
    from qzo.models.load import _publish

    target, late = tmp_path / "model", tmp_path / ".tmp-late"
    for folder, tag in ((tmp_path / ".tmp-first", "first"), (late, "late")):
        folder.mkdir()
        (folder / "config.json").write_text(tag)
    _publish(tmp_path / ".tmp-first", target)
    opened = open(target / "config.json")  # a reader in the middle of loading
    _publish(late, target)
    assert (target / "config.json").read_text() == "first" and opened.read() == "first"
    opened.close()
    stale = tmp_path / "stale"  # a folder without config.json (an older qzo's leftover) is replaced
    stale.mkdir()
    (stale / "junk").write_text("x")
    _publish(late, stale)
    assert (stale / "config.json").read_text() == "late" and not (stale / "junk").exists()
