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
