"""The prepared GPU check (benchmarks/gpu_check.py): its 4-bit builder, its streaming seam, and its CPU rehearsal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import qzo
from qzo.models.streaming import StreamPlan, streamed_layers

from helpers import tiny_config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _build4bit import (  # noqa: E402
                        build_4bit, packed_bytes, random_weight, sixteen_bit_linears, stream, streaming_plan)


def _ordinary_folder(model, cfg, folder, tokenizer, seed):
    """The same weights as ``model`` in a plain 16-bit model folder: the linears from random_weight, the rest copied."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    head = ref.get_output_embeddings()
    linears = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    built = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.rsplit(".", 1)[0] in linears:
                p.copy_(random_weight(name, tuple(p.shape), torch.float32, "cpu", seed))
            else:
                p.copy_(built[name])
    ref.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_model_built_in_4bit_computes_what_quantizing_the_same_weights_on_load_computes(double_quant, tmp_path,
                                                                                           tiny_tokenizer):
    cfg = tiny_config(vocab_size=256)
    cfg.tie_word_embeddings = False
    model = build_4bit(cfg, double_quant=double_quant, seed=5)
    assert sixteen_bit_linears(model) == [] and model.is_loaded_in_4bit
    assert model.lm_head.weight.dtype == torch.float32  # bitsandbytes leaves the head unquantized
    reference, _ = qzo.load(_ordinary_folder(model, cfg, tmp_path, tiny_tokenizer, 5), "nf4", double_quant=double_quant)
    weights = sum(i * o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert packed_bytes(model) == packed_bytes(reference) == cfg.num_hidden_layers * weights // 2
    a = model.model.layers[1].mlp.down_proj.weight
    b = reference.model.layers[1].mlp.down_proj.weight
    assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_layers_built_on_the_host_stream_to_the_logits_of_the_model_built_whole(tmp_path):
    cfg = tiny_config(vocab_size=256)
    cfg.num_hidden_layers = 3
    whole = build_4bit(cfg, seed=1)
    plan = StreamPlan({1: "cpu", 2: "disk"}, torch.device("cpu"))
    model = build_4bit(cfg, seed=1, host_layers=plan.layers)
    handle = stream(model, plan, tmp_path)
    assert streamed_layers(model) is handle and handle.stored_bytes == packed_bytes(whole, layers={1, 2})
    assert (tmp_path / "qzo-packed" / "layer-00002.bin").stat().st_size == packed_bytes(whole, layers={2})
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(2):  # the read-ahead wraps from the last streamed layer to the first of the next forward
            assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert packed_bytes(model, layers={1, 2}) == 0  # dropped again after the forward
    assert handle.bytes_streamed == 2 * handle.stored_bytes


def test_streaming_plan_reads_max_memory_as_qzo_load_does():
    cfg = tiny_config(vocab_size=256)
    cfg.num_hidden_layers = 4
    assert streaming_plan(cfg, {"cpu": "1GiB"}) is None  # everything fits
    plan = streaming_plan(cfg, {"cpu": "10KB"})
    assert plan is not None and set(plan.layers.values()) == {"disk"} and len(plan.layers) >= 1


def test_the_rehearsal_runs_every_stage_on_cpu(tmp_path, capsys):
    import gpu_check

    summary = gpu_check.main(["--rehearse", "--results", str(tmp_path)])
    stages = {s["stage"]: s for s in summary["stages"]}
    assert set(stages) == {s.name for s in gpu_check.gpu_stages()}  # the GPU run's stages, each rehearsed
    assert all(s["status"] == "ok" for s in stages.values()), {k: s.get("tail") for k, s in stages.items()}
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["rehearsal"] is True and saved["device"].startswith("CPU")
    memory = [r for r in saved["table"] if r["what"] == "memory"]
    assert {r["method"] for r in memory} == {"inference", "qzo_spsa", "qzo_gv4", "first_order_qlora"}
    streamed = [r for r in memory if r["streamed_layers"]]
    assert streamed and all(r["streamed_gib_per_step"] is not None and r["peak_gib"] for r in streamed)
    assert all(r["planner_gib"] for r in memory if r["method"] != "first_order_qlora")
    assert {r["what"] for r in saved["table"]} == {"memory", "pool-batched", "kernels"}
    assert all((tmp_path / name).is_file() for name in gpu_check.RESULT_FILES)
    out = capsys.readouterr().out
    assert "GPU check REHEARSAL" in out and "streamed" in out


def test_the_gpu_stages_arguments_are_what_their_scripts_take(tmp_path, monkeypatch):
    """The GPU run's own command lines, as far as a CPU can take them: memory.py's as planner rows, the rest parsed."""
    import _common
    import gpu_check

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    for stage in gpu_check.gpu_stages():
        if stage.argv[0] == "-m":
            continue  # pytest: its command is the rehearsal's, less the -k filter
        extra = ["--planner-only"] if stage.argv[0].endswith("memory.py") else ["--help"]
        code, out = gpu_check.run_in_process(gpu_check.Stage(stage.name, stage.argv + extra, 1, 0, stage.what))
        assert code == 0, f"{stage.name}: {out[-2000:]}"
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    streamed = [r for r in rows if r["model"] == gpu_check.STREAMED_70B]
    assert streamed and all(r["planner_gib"] < 20 for r in streamed)  # the planner fits it in the 20 GiB budget
    assert {r["lever"] for r in rows} >= {"none"} and len({r["lever"] for r in rows}) == 2


def test_a_stage_past_its_budget_is_killed_and_the_rest_still_run(tmp_path):
    import gpu_check

    stages = [gpu_check.Stage("hang", ["-c", "import time; print('started', flush=True); time.sleep(60)"], 2, 0, "x"),
              gpu_check.Stage("fails", ["-c", "raise SystemExit(3)"], 10, 0, "y"),
              gpu_check.Stage("late", ["-c", "pass"], 10, 7, "z")]  # < 7 s left by then
    summary = gpu_check.run_stages(stages, tmp_path, deadline_s=8, copy_to=tmp_path / "out", meta={"device": "test"})
    got = {s["stage"]: s for s in summary["stages"]}
    assert got["hang"]["status"] == "timeout" and "started" in got["hang"]["tail"] and got["hang"]["wall_s"] < 10
    assert got["fails"]["status"] == "failed" and got["fails"]["returncode"] == 3
    assert got["late"]["status"] == "skipped" and "before the deadline" in got["late"]["why"]
    assert (tmp_path / "out" / "gpu_check.json").is_file()
    assert "===== hang: timeout" in (tmp_path / "stages.log").read_text()
