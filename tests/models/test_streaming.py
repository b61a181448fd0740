"""Streaming 4-bit offload (qzo.models.streaming): offloaded layers stay packed on disk and train to the same numbers."""

import json

import pytest
import torch
from safetensors.torch import load_file

import qzo
from qzo.errors import QzoError
from qzo.models.streaming import streamed_layers

from test_offload import _run as offloaded_run

# decoder layer 1 streams from disk; the map's other entries keep their meaning (the final norm stays resident:
# streaming moves 4-bit codes, and a norm has none)
DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _run(model_dir, data, out, **extra):
    return offloaded_run(model_dir, data, out, **{"model.quant": "nf4", **extra})


@pytest.mark.parametrize("strategy", ["spsa", "gv"])
def test_a_run_streaming_a_layer_from_disk_equals_the_run_in_memory(strategy, tiny_model_dir, code_chats, tmp_path):
    extra = {"optim.strategy": f"{{name: {strategy}{', pool: 2' if strategy == 'gv' else ''}}}"}
    whole = _run(tiny_model_dir, code_chats, tmp_path / "whole", **extra)
    streamed = _run(tiny_model_dir, code_chats, tmp_path / "streamed", **extra, **{
        "model.device_map": DISK_MAP, "model.offload_folder": str(tmp_path / "offload")})
    steps = [[json.loads(line) for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
             for run in ("whole", "streamed")]
    assert [s["losses"] for s in steps[0]] == [s["losses"] for s in steps[1]]  # bit for bit
    assert whole["final_eval_loss"] == streamed["final_eval_loss"]
    a, b = (load_file(str(tmp_path / run / "checkpoints/step-000004/trainables.safetensors"))
            for run in ("whole", "streamed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if strategy == "spsa":  # a merged export of a streaming run reads the streamed layers' codes back
        from qzo.export.formats import export

        merged = [load_file(str(export(tmp_path / run, "merged", out=tmp_path / f"{run}-merged", dtype="float32",
                                       log=lambda _: None) / "model.safetensors"))
                  for run in ("whole", "streamed")]
        assert merged[0].keys() == merged[1].keys()
        assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def test_streamed_layers_keep_no_codes_in_memory_between_forwards(tiny_model_dir, tiny_batch, tmp_path):
    reference, _ = qzo.load(tiny_model_dir, "nf4")
    model, _ = qzo.load(tiny_model_dir, "nf4", device_map=DISK_MAP, offload_folder=str(tmp_path))
    streamed = streamed_layers(model)
    q = model.model.layers[1].self_attn.q_proj
    expected = reference.model.layers[1].self_attn.q_proj.weight
    assert q.weight.numel() == 0 and model.model.layers[0].self_attn.q_proj.weight.numel() > 0
    stored = tmp_path / "qzo-packed" / "layer-00001.bin"
    assert stored.stat().st_size == streamed.stored_bytes  # the packed codes, not a 16-bit copy
    offset, shape = streamed._index[1]["self_attn.q_proj"]
    raw = torch.frombuffer(bytearray(stored.read_bytes()), dtype=torch.uint8)
    assert torch.equal(raw[offset:offset + expected.numel()].view(shape), expected.data)
    assert expected.dtype == torch.uint8
    params = qzo.lora(model, r=4, seed=3)  # adapters of a streamed layer live on the execution device
    assert {t.tensor.device.type for t in params} == {"cpu"}
    with torch.no_grad():
        got = model(**tiny_batch).logits
        want = qzo.lora(reference, r=4, seed=3).peft_model(**tiny_batch).logits
    assert torch.equal(got, want)
    assert model.model.layers[1].self_attn.q_proj.base_layer.weight.numel() == 0  # dropped again after the forward
    assert streamed.bytes_streamed == streamed.stored_bytes  # one forward copied the layer in once


def test_auto_with_a_cpu_budget_streams_the_layers_that_do_not_fit(tiny_model_dir, tmp_path):
    # 10 KB: less than any decoder layer of the tiny model (its whole 4-bit model is under 1 MB)
    model, _ = qzo.load(tiny_model_dir, "nf4", device_map="auto", max_memory={"cpu": "10KB"},
                        offload_folder=str(tmp_path))
    streamed = streamed_layers(model)
    assert streamed is not None and set(streamed.plan.layers.values()) == {"disk"}
    assert all(model.model.layers[i].self_attn.q_proj.weight.numel() == 0 for i in streamed.plan.layers)


def test_disk_streaming_without_a_folder_and_int8_on_cpu_are_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(QzoError, match="set model.offload_folder"):
        qzo.load(tiny_model_dir, "nf4", device_map=DISK_MAP)
    if not torch.cuda.is_available():
        with pytest.raises(QzoError, match="use model.quant: nf4"):
            qzo.load(tiny_model_dir, "int8", device_map="auto", max_memory={"cpu": "1MB"},
                     offload_folder=str(tmp_path))


def test_an_odd_number_of_streamed_layers_reads_right_forward_after_forward(tmp_path):
    # reads alternate between two host buffers; with 3 streamed layers the read ahead wraps from the
    # last layer to the first of the next forward, in the buffer the layer before it used
    from helpers import tiny_config

    cfg = tiny_config(vocab_size=256)
    cfg.num_hidden_layers = 3
    reference, _ = qzo.load(cfg, "nf4", seed=0)
    model, _ = qzo.load(cfg, "nf4", seed=0, device_map="auto", max_memory={"cpu": "10KB"},
                        offload_folder=str(tmp_path))
    assert sorted(streamed_layers(model).plan.layers) == [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            ids = torch.randint(0, 256, (2, 12), generator=g)
            assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
