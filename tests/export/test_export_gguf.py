"""qzo export --gguf: a llama.cpp GGUF that reads back (transformers ``gguf_file=``) as the merged model.

The model is the tiny Llama of ``helpers.tiny_config`` with a tiny byte-level BPE tokenizer trained here
(400 tokens, SmolLM2's chat template): a GGUF's tokenizer metadata is parsed in Python on
every read, and SmolLM2's 49,152 tokens and 48,900 merges take 10-30 s a read on this CPU.
Tolerances, logits of the read-back model against the trained model's (relative L2 error),
and each weight against the merged float32 one:

* f16: each weight is the merged float32 one rounded once to float16 (11 significant bits;
  equal, checked exactly), logits within 0.3% (0.054% measured);
* q8_0: llama.cpp's blocks of 32 int8 values and one float16 scale (a step of absmax / 127):
  each weight within 0.8% (0.57% measured), logits within 3% (1.2% measured on this random
  model, whose logits are small differences of large terms).

The LoRA adapter GGUF (--gguf-lora) is checked in llama.cpp's own layout: the base's GGUF
plus alpha / r * B @ A gives the merged GGUF, tensor by tensor, to one float16 step.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

from qzo.cli.main import main
from qzo.errors import QzoError
from qzo.export.formats import export, merged_state_dict
from qzo.export.gguf import modelfile, permute_for_llama_cpp, write_gguf
from qzo.runs.reader import load_run_model
from qzo.train.loop import train

from helpers import TINY, run_overrides, write_code_chats

PROMPT = [[1, 50, 3, 17, 190, 42, 7, 7, 2]]
TEXTS = ["Code 12? CODE\n\n  spaced  out ünï", "<|im_start|>user\nCode 3?<|im_end|>\n"]


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROMPT)).logits.float()


def _rel(got, want):
    return ((got - want).norm() / want.norm()).item()


def _tiny_bpe(chat_template: str, corpus: list[str]):
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) of 400 tokens, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def gguf_run(tiny_tokenizer, tmp_path_factory):
    """A trained run (LoRA + NF4 scales of q_proj) of a tiny Llama with a tiny tokenizer, and its logits."""
    root = tmp_path_factory.mktemp("gguf")
    data = write_code_chats(root)
    chats = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    corpus = [tiny_tokenizer.apply_chat_template(c, tokenize=False) for c in chats] * 4 + TEXTS
    tok = _tiny_bpe(tiny_tokenizer.chat_template, corpus)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), **TINY))
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    run = root / "run"
    sets = {"train.steps": 2, "targets.scales": "[q_proj]", "train.max_len": 96}
    train(None, run_overrides(root / "tiny", data, run, **sets),
          progress=False, log=lambda *_: None)
    trained, tok, params, _ = load_run_model(run)
    assert max(t.tensor.abs().max().item() for t in params if "lora_B" in t.name) > 0  # trained: LoRA is in the merge
    return run, tok, _logits(trained), merged_state_dict(trained, torch.float32)


@pytest.mark.parametrize("kind, logit_tol, weight_tol", [("f16", 3e-3, 5e-4), ("q8_0", 3e-2, 8e-3)])
def test_gguf_reads_back_as_the_merged_model(gguf_run, kind, logit_tol, weight_tol):
    run, tok, expected, merged = gguf_run
    out = export(run, "gguf", gguf_type=kind, log=lambda *_: None)
    assert out == run / f"export-gguf-{kind}"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", f"model-{kind}.gguf", "qzo_export.json"]
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"model-{kind}.gguf", dtype=torch.float32)
    rel = _rel(_logits(back), expected)
    print(f"{kind}: relative logit error {rel:.2e}")
    assert rel <= logit_tol
    state = back.state_dict()
    assert state.keys() >= merged.keys() - {"lm_head.weight"}
    worst = max(_rel(state[k], v) for k, v in merged.items() if v.dim() == 2)
    print(f"{kind}: worst relative weight error {worst:.2e}")
    assert worst <= weight_tol  # q_proj and k_proj too: the permutation came back undone
    if kind == "f16":  # exactly the merged float32 weights rounded once to float16
        assert all(torch.equal(state[k], v.half().float()) for k, v in merged.items() if v.dim() == 2)
    assert all(torch.equal(state[k], v) for k, v in merged.items() if v.dim() == 1)  # norms stay float32
    # the tokenizer: the same ids, specials and chat template from the GGUF's metadata alone
    back_tok = AutoTokenizer.from_pretrained(out, gguf_file=f"model-{kind}.gguf")
    chat = tok.apply_chat_template([{"role": "user", "content": "Code 7?"}], tokenize=False, add_generation_prompt=True)
    for text in TEXTS + [chat]:
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"], text
    assert back_tok.chat_template == tok.chat_template
    assert (back_tok.bos_token, back_tok.eos_token, back_tok.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    note = json.loads((out / "qzo_export.json").read_text())
    assert note["type"] == kind and note["tokenizer"] == "built from the Hugging Face tokenizer"


def test_modelfile_has_the_template_system_prompt_and_stops(gguf_run, tiny_tokenizer):
    _, tok, _, _ = gguf_run
    text = modelfile("model-f16.gguf", tok)
    lines = text.splitlines()
    assert "FROM ./model-f16.gguf" in lines
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    # SmolLM2's template adds this system turn to a chat without one; Ollama adds SYSTEM the same way
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert [line for line in lines if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']


def test_a_base_from_a_gguf_keeps_its_tokenizer_metadata(gguf_run, tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("QZO_CACHE", str(tmp_path / "cache"))  # the base GGUF is converted once, into here
    run, _, _, _ = gguf_run
    source = export(run, "gguf", out=tmp_path / "base", gguf_type="f16", log=lambda *_: None) / "model-f16.gguf"
    data = write_code_chats(tmp_path)
    second = tmp_path / "second"
    train(None, run_overrides(source, data, second, **{"train.steps": 1}), progress=False, log=lambda *_: None)
    assert main(["export", str(second), "--gguf", "--type", "q8_0"]) == 0
    out = second / "export-gguf-q8_0"

    def tokenizer_fields(path):
        fields = gguf.GGUFReader(str(path)).fields
        return {k: (f.types, f.contents()) for k, f in fields.items() if k.startswith("tokenizer.")}

    copied, original = tokenizer_fields(out / "model-q8_0.gguf"), tokenizer_fields(source)
    assert copied == original and "tokenizer.ggml.merges" in copied
    assert json.loads((out / "qzo_export.json").read_text())["tokenizer"] == "copied from the base's GGUF"


def test_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.randn(6 * 10, 7)  # 6 heads of 10 rows: odd sizes, so a wrong reshape shows
    undo = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 6})
    back = undo.process(permute_for_llama_cpp(weight, 6).numpy(), "blk.0.attn_q.weight").weights
    assert torch.equal(torch.from_numpy(back), weight)
    assert not torch.equal(permute_for_llama_cpp(weight, 6), weight)


def test_mistral_writes_and_other_architectures_are_refused(gguf_run, tmp_path):
    _, tok, _, _ = gguf_run
    torch.manual_seed(0)
    mistral = AutoModelForCausalLM.from_config(MistralConfig(vocab_size=len(tok), sliding_window=None, **TINY))
    path = write_gguf(tmp_path / "mistral.gguf", mistral, tok, "f16")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert _rel(_logits(back), _logits(mistral)) <= 3e-3
    qwen = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=len(tok), **TINY))
    with pytest.raises(QzoError, match="this base is qwen2: export it with --merged"):
        write_gguf(tmp_path / "qwen.gguf", qwen, tok, "f16")
    with pytest.raises(QzoError, match="unknown GGUF type 'q4_k'; choose one of f16, q8_0"):
        write_gguf(tmp_path / "q.gguf", mistral, tok, "q4_k")


def test_cli_type_needs_gguf(gguf_run, capsys):
    run, _, _, _ = gguf_run
    assert main(["export", str(run), "--merged", "--type", "q8_0"]) == 2
    assert "--type q8_0 is the GGUF type and goes with --gguf" in capsys.readouterr().err


def test_llama3_rope_scaling_is_written_as_llama_cpp_factors(gguf_run, tmp_path):
    import gguf

    _, tok, _, _ = gguf_run
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), rope_parameters=rope, **TINY))
    path = write_gguf(tmp_path / "llama3.gguf", model, tok, "f16")
    reader = gguf.GGUFReader(str(path))
    factors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}["rope_freqs.weight"]
    # per rotary frequency (head_dim / 2 of them): 1 where the wavelength is short, the full factor where it is
    # long, rising in between: what llama.cpp divides each frequency by
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    assert factors.dtype == torch.float32 and factors.shape == (head_dim // 2,)
    assert factors[0] == 1 and factors[-1] == 8 and bool((factors[1:] >= factors[:-1]).all())
    assert reader.fields["llama.rope.freq_base"].contents() == 500000.0


@pytest.fixture(scope="module")
def lora_run(gguf_run, tmp_path_factory):
    """A LoRA-only run of the same tiny model, its logits, and its base (NF4, no adapter) as an f16 GGUF."""
    import qzo

    run, tok, _, _ = gguf_run
    root = tmp_path_factory.mktemp("gguf-lora")
    train(None, run_overrides(run.parent / "tiny", write_code_chats(root), root / "run",
                              **{"train.steps": 1, "train.max_len": 96}), progress=False, log=lambda *_: None)
    trained, _, _, _ = load_run_model(root / "run")
    base_model, _ = qzo.load(run.parent / "tiny", "nf4")  # what the adapter was trained on, without it
    return root / "run", _logits(trained), write_gguf(root / "base.gguf", base_model, tok, "f16")


def test_lora_adapter_gguf_adds_up_to_the_merged_gguf(lora_run, tmp_path):
    """base GGUF + alpha / r * B A (llama.cpp's adapter, in llama.cpp's layout) == the merged GGUF, tensor by tensor."""
    import gguf

    run, _, base = lora_run
    adapter = export(run, "gguf-lora", out=tmp_path / "adapter", log=lambda *_: None)
    merged = export(run, "gguf", out=tmp_path / "merged", log=lambda *_: None) / "model-f16.gguf"

    def tensors(path):
        reader = gguf.GGUFReader(str(path))
        return reader, {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}

    reader, lora = tensors(adapter / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    _, want = tensors(merged)
    _, have = tensors(base)
    assert {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")} == {
        f"blk.{i}.attn_{m}.weight" for i in range(2) for m in ("q", "v")}
    scale = 16.0 / 4  # lora.alpha / lora.r
    for name, weight in have.items():
        if f"{name}.lora_a" in lora:
            weight = weight + scale * lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"]
        # each side rounded once to float16: within a float16 step (2^-10 of the tensor's largest magnitude)
        torch.testing.assert_close(weight, want[name], rtol=0, atol=2**-10 * want[name].abs().max().item())
    assert any(not torch.equal(have[n.removesuffix(".lora_a")], want[n.removesuffix(".lora_a")]) for n in lora
               if n.endswith(".lora_a"))  # the adapter did move the weights it adapts
    text = (adapter / "Modelfile").read_text()
    assert "FROM ./base.gguf" in text and "ADAPTER ./adapter.gguf" in text


def test_llama_cpp_runs_the_files(gguf_run, lora_run, tmp_path):
    """llama.cpp itself: the files load, give the trained logits and tokenize as transformers does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: llama.cpp's own reading "
                                    "of the exported GGUF is not checked here (pip install llama-cpp-python)")
    import numpy as np

    run, tok, expected, _ = gguf_run
    # llama.cpp's CPU matmuls round the activations to the weights' type too (float16, or Q8_0 blocks)
    for kind, tol in (("f16", 3e-3), ("q8_0", 4e-2)):  # measured: 6.7e-4, 1.5e-2
        out = export(run, "gguf", out=tmp_path / kind, gguf_type=kind, log=lambda *_: None)
        llm = llama_cpp.Llama(str(out / f"model-{kind}.gguf"), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
        llm.eval(PROMPT[0])
        got = torch.from_numpy(np.array(llm.scores[:len(PROMPT[0])], dtype=np.float32))
        print(f"llama.cpp {kind}: relative logit error {_rel(got, expected[0]):.2e}")
        assert _rel(got, expected[0]) <= tol
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], text
    run, expected, base = lora_run  # the adapter on the base's GGUF: the trained model
    adapter = export(run, "gguf-lora", out=tmp_path / "adapter", log=lambda *_: None) / "adapter.gguf"
    llm = llama_cpp.Llama(str(base), lora_path=str(adapter), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(PROMPT[0])
    got = torch.from_numpy(np.array(llm.scores[:len(PROMPT[0])], dtype=np.float32))
    print(f"llama.cpp base + adapter: relative logit error {_rel(got, expected[0]):.2e}")
    assert _rel(got, expected[0]) <= 3e-3
