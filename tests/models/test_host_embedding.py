"""model.embedding_on_cpu: the input embedding kept in host RAM, ids routed to it, values unchanged."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import qzo
from qzo.data.dataset import model_input_device
from qzo.errors import QzoError
from qzo.models.host_embedding import execution_device, keep_input_embedding_on_host
from qzo.train.plan import plan

from helpers import TINY


def _untied_model_dir(tmp_path, tok):
    cfg = LlamaConfig(vocab_size=len(tok), **{**TINY, "tie_word_embeddings": False})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def _loss(model, batch):
    device = model_input_device(model)
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits


def test_routed_lookup_gives_the_same_logits(tmp_path, tiny_tokenizer, tiny_batch):
    folder = _untied_model_dir(tmp_path, tiny_tokenizer)
    model, _ = qzo.load(str(folder), "nf4")
    before = _loss(model, tiny_batch)
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, o: calls.append(a[0].device))
    # the CPU stands in for the GPU here: the routing (ids down, states back) is what runs
    assert keep_input_embedding_on_host(model, device="cpu")
    assert model_input_device(model) == torch.device("cpu")
    after = _loss(model, tiny_batch)
    assert calls and calls[-1].type == "cpu"
    assert torch.equal(before, after)
    names = [n for n, _ in model.named_parameters()]
    assert "model.embed_tokens.weight" in names  # same module, same name: exports and state_dict are unchanged


def test_a_model_on_the_cpu_is_left_alone(tmp_path, tiny_tokenizer, tiny_batch, capsys):
    folder = _untied_model_dir(tmp_path, tiny_tokenizer)
    model, _ = qzo.load(str(folder), "nf4", embedding_on_cpu=True)
    assert execution_device(model).type == "cpu"
    assert getattr(model, "qzo_input_device", None) is None  # nothing to move: the lookup is on the CPU already
    assert "host RAM" not in capsys.readouterr().out
    plain, _ = qzo.load(str(folder), "nf4")
    assert torch.equal(_loss(model, tiny_batch), _loss(plain, tiny_batch))


def test_tied_models_are_refused_with_the_reason(tiny_model_dir):
    with pytest.raises(QzoError, match="ties its input embedding to the LM head.*unset model.embedding_on_cpu"):
        qzo.load(str(tiny_model_dir), "nf4", embedding_on_cpu=True)
    with pytest.raises(QzoError, match="ties its input embedding"):
        plan("smollm2-135m", embedding_on_cpu=True)


def test_planner_takes_the_embedding_off_the_gpu():
    base = plan("llama-3.1-8b")
    moved = plan("llama-3.1-8b", embedding_on_cpu=True)
    assert base.weights - moved.weights == 128_256 * 4096 * 2
    assert any("host RAM" in n for n in moved.notes)
    assert any("embedding_on_cpu: true" in n for n in base.notes)  # the lever is named where it would help


@pytest.mark.parametrize("model,target", [("llama-2-7b", 4.5), ("llama-3.1-8b", 5.5), ("llama-2-13b", 8.0)])
def test_issue_15_targets_are_met_by_the_recipes_levers(model, target):
    """8 x 512, LoRA r 8 on q,v, NF4, double quantization and the embedding on the CPU (what the recipes set)."""
    assert plan(model, double_quant=True, embedding_on_cpu=True).total / 2**30 <= target
