"""``qzo export RUN --gguf [--type f16|q8_0]``: the trained model as one GGUF file for llama.cpp and Ollama.

What is written is the merged model (:func:`qzo.export.merge.merged_tensors`: every quantized
weight dequantized with its trained scales, dense slices as trained, LoRA folded in), laid
out the way llama.cpp's own converter lays out a Hugging Face Llama:

* tensor names through the ``gguf`` package's name map (``gguf.get_tensor_name_map`` for
  ``MODEL_ARCH.LLAMA``: ``model.layers.0.self_attn.q_proj`` is ``blk.0.attn_q``); a tied
  output head is left out (llama.cpp then reads ``token_embd``);
* the rows of ``q_proj`` and ``k_proj`` permuted per head from Hugging Face's rotary layout
  (the two halves of a head rotate together) to llama.cpp's (neighbouring pairs rotate);
  readers undo it (transformers' GGUF loader does, which is what the tests read back with);
* ``f16``: every matrix in float16, vectors (norms) in float32. ``q8_0``: matrices in
  llama.cpp's Q8_0 blocks (32 int8 values and one float16 scale: 8.5 bits a weight),
  through ``gguf.quants``; a matrix whose rows are not whole blocks stays float16;
* the hyperparameters llama.cpp reads (``llama.*``), with Llama-3's rope scaling as the
  ``rope_freqs`` factors and linear rope scaling as its factor.

The tokenizer: when the run's base was a GGUF (the demo's is), its ``tokenizer.*`` metadata
is copied as it is, so llama.cpp tokenizes as it did for the original file. Otherwise it is
built from the Hugging Face tokenizer, which works for byte-level BPE vocabularies (GPT-2
style: Llama-3, SmolLM2, Qwen2, Mistral's tekken): tokens in id order, control and
user-defined token types from the added tokens, merges and special ids through
``gguf.SpecialVocab``, the chat template, and the pre-tokenizer named from the tokenizer's
split rule (``tokenizer.ggml.pre``; an unknown rule falls back to llama.cpp's ``default``,
said when it happens). A sentencepiece vocabulary (Llama-2, Mistral v0.1) is refused with
a message: llama.cpp needs its scores, which only its ``tokenizer.model`` has.

Beside the file, :func:`modelfile` writes an Ollama ``Modelfile``: ``FROM ./<file>``, the
chat template in Ollama's Go template syntax for the families it knows (ChatML, Llama-3),
the template's default system prompt, and ``stop`` parameters for the turn markers.

``--gguf-lora`` (:func:`write_lora_gguf`) writes a LoRA-only run's adapter as llama.cpp's
LoRA GGUF (``general.type adapter``, ``adapter.lora.alpha``; per adapted weight
``<name>.lora_a`` = A and ``<name>.lora_b`` = B, float32, B's rows permuted like the weight's
for q/k) for the base model's GGUF: ``llama-cli -m BASE.gguf --lora adapter.gguf``, or
``ADAPTER`` in a Modelfile. It is the delta qzo trained on the 4-bit base; on another
quantization of the same base (the Q4_1 the demo started from) it adds the same delta.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from ..errors import QzoError, check_choice
from ..targets import unwrap_peft

__all__ = ["GGUF_TYPES", "write_gguf", "write_lora_gguf", "modelfile", "permute_for_llama_cpp", "chat_family"]

GGUF_TYPES = ("f16", "q8_0")
_ARCHS = ("llama", "mistral")  # Hugging Face model types llama.cpp runs as its "llama" architecture
_F16_MAX = 65504.0


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a ``q_proj`` / ``k_proj`` weight (or bias) from Hugging Face's rotary layout to llama.cpp's.

    Per head, Hugging Face keeps the first and second halves of the head's dimensions as the
    rotated pairs; llama.cpp keeps neighbours. Row ``h * d + 2 i + j`` of the result is row
    ``h * d + j * d / 2 + i`` of ``weight`` (``d`` the head size, ``j`` 0 or 1).
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, model, tok, gguf_type: str = "f16", source_gguf=None, name: str | None = None, log=print) -> Path:
    """Write ``model`` (qzo's, trained values in it) as a GGUF file at ``path``.

    Args:
        path: the ``.gguf`` file to write (its folder must exist).
        model: the model with its trained values (LoRA, scales, dense slices) in place.
        tok: its tokenizer (used when there is no ``source_gguf``).
        gguf_type: ``f16`` or ``q8_0`` (:data:`GGUF_TYPES`).
        source_gguf: the GGUF the base came from: its tokenizer metadata is copied.
        name: ``general.name`` of the file.

    Returns:
        ``path``.
    """
    import gguf

    from .merge import merged_tensors

    check_choice("GGUF type", gguf_type, GGUF_TYPES)
    config = unwrap_peft(model).config
    _check_architecture(config)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    file_type = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    _add_hyperparameters(writer, config, name or "qzo fine-tune", file_type)
    if source_gguf is not None:
        _copy_tokenizer(writer, Path(source_gguf), config.vocab_size)
    else:
        _add_hf_tokenizer(writer, tok, config.vocab_size, log)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for hf_name, value in merged_tensors(model):
        if isinstance(value, str):  # a tied output head: llama.cpp uses token_embd when output.weight is absent
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise QzoError(f"GGUF export: {hf_name} has no name in llama.cpp's Llama layout; this model is not a plain "
                           "Llama: export it with --merged and convert that with llama.cpp's convert_hf_to_gguf.py")
        if ".self_attn.q_proj." in hf_name:
            value = permute_for_llama_cpp(value, heads)
        elif ".self_attn.k_proj." in hf_name:
            value = permute_for_llama_cpp(value, kv_heads)
        _add_tensor(writer, gguf_name, value, gguf_type, hf_name)
    factors = _llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_lora_gguf(path, lora: dict, config, alpha: float, name: str | None = None) -> Path:
    """Write LoRA tensors (peft's saved names) as a llama.cpp LoRA adapter GGUF at ``path``.

    Args:
        path: the ``.gguf`` file to write.
        lora: ``base_model.model.<module>.lora_A.weight`` / ``lora_B`` tensors, as qzo saves them.
        config: the base model's ``transformers`` config (architecture, layers, heads).
        alpha: the run's ``lora.alpha`` (llama.cpp scales the adapter by alpha / r, like peft).
        name: ``general.name`` of the file.

    Returns:
        ``path``.
    """
    import gguf

    _check_architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name or "qzo LoRA adapter")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for key in sorted(k for k in lora if ".lora_A." in k):
        module = key.split(".lora_A.", 1)[0].removeprefix("base_model.model.")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise QzoError(f"GGUF adapter export: {module} has no name in llama.cpp's Llama layout")
        a = lora[key].float()  # (r, in)
        b = lora[key.replace(".lora_A.", ".lora_B.")].float()  # (out, r): its rows are the weight's rows
        if module.endswith(".self_attn.q_proj"):
            b = permute_for_llama_cpp(b, config.num_attention_heads)
        elif module.endswith(".self_attn.k_proj"):
            b = permute_for_llama_cpp(b, config.num_key_value_heads)
        writer.add_tensor(target + ".lora_a", a.contiguous().numpy())
        writer.add_tensor(target + ".lora_b", b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _check_architecture(config) -> None:
    kind = getattr(config, "model_type", None)
    if kind not in _ARCHS or (kind == "mistral" and getattr(config, "sliding_window", None)):
        what = f"{kind} with a sliding window" if kind == "mistral" else kind
        raise QzoError(f"GGUF export writes Llama-architecture models (model types {', '.join(_ARCHS)}, no sliding "
                       f"window); this base is {what}: export it with --merged and convert that folder with "
                       "llama.cpp's convert_hf_to_gguf.py")


def _rope(config) -> dict:
    """The rope settings, however this transformers version spells them (``rope_parameters`` or ``rope_scaling``)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def _add_hyperparameters(writer, config, name: str, file_type) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):
        raise QzoError(f"GGUF export: rope type {rope['rope_type']!r} is not written yet (default, linear and llama3 "
                       "are); export with --merged and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _llama3_rope_factors(config) -> torch.Tensor | None:
    """Llama-3's rope scaling as llama.cpp reads it: per rotary frequency, the factor it is divided by.

    Computed from transformers' own rope functions: default inverse frequencies / Llama-3's.
    """
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return (plain / scaled.float()).float().contiguous()


def _add_tensor(writer, name: str, value: torch.Tensor, gguf_type: str, hf_name: str) -> None:
    import gguf

    value = value.float()
    if not torch.isfinite(value).all():
        raise QzoError(f"GGUF export: {hf_name} holds NaN or inf values; export an earlier checkpoint (--checkpoint)")
    if value.dim() < 2:  # norms and biases stay float32, as llama.cpp's converter keeps them
        writer.add_tensor(name, value.numpy())
        return
    if gguf_type == "q8_0" and value.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        codes = gguf.quants.quantize(value.numpy(), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, codes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return
    peak = value.abs().max().item()
    if peak > _F16_MAX:
        raise QzoError(f"GGUF export: {hf_name} has a value of {peak:.4g}, beyond float16's range (65504), so it "
                       "cannot be written as f16; export with --merged (bfloat16) instead")
    writer.add_tensor(name, value.to(torch.float16).numpy())


def _copy_tokenizer(writer, source: Path, vocab_size: int) -> None:
    """Every ``tokenizer.*`` key of the base's GGUF, with its type, as llama.cpp wrote it."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise QzoError(f"the base's GGUF {str(source)!r} has no tokenizer metadata to copy")
    if len(tokens.data) != vocab_size:
        raise QzoError(f"the base's GGUF {str(source)!r} has {len(tokens.data)} tokens but the model {vocab_size} "
                       "embedding rows; pass the GGUF the run was trained from (--base)")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def _add_hf_tokenizer(writer, tok, vocab_size: int, log) -> None:
    """The tokenizer metadata llama.cpp reads, from a Hugging Face byte-level BPE tokenizer."""
    import gguf

    if tok is None:
        raise QzoError("GGUF export needs the run's tokenizer, and its base has none")
    with tempfile.TemporaryDirectory(prefix="qzo-tok-") as folder:
        tok.save_pretrained(folder)
        spec_file = Path(folder) / "tokenizer.json"
        if not spec_file.is_file():
            raise QzoError("GGUF export: this tokenizer has no tokenizer.json (a slow tokenizer); llama.cpp's "
                           "vocabulary is built from one: convert the --merged export with llama.cpp's "
                           "convert_hf_to_gguf.py")
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    model = spec.get("model") or {}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise QzoError(f"GGUF export: this tokenizer is a {model.get('type')} vocabulary without byte-level decoding "
                       "(sentencepiece style), whose llama.cpp form needs the scores in its tokenizer.model; export "
                       "with --merged and convert that folder with llama.cpp's convert_hf_to_gguf.py, or train from "
                       "the model's GGUF (its tokenizer is then copied)")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise QzoError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model only "
                       f"{vocab_size} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows no token uses, as llama.cpp's converter names them
    types = [gguf.TokenType.USER_DEFINED] * vocab_size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for index, added in tok.added_tokens_decoder.items():
        if index < vocab_size:
            types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, log))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.chat_template = tok.chat_template or special.chat_template
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(spec: dict, log) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (``tokenizer.ggml.pre``)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for known, split in GGUF_PRE_TOKENIZER_SPLITS.items():  # the names transformers reads back, llama.cpp's
            if regex == split:
                return known
    log("qzo: GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp names here; the file says 'default', "
        "so llama.cpp may split text before BPE differently from transformers (training from the model's GGUF "
        "copies its tokenizer exactly)")
    return "default"


# Ollama's Go templates for the chat formats qzo recognises, and the markers that end a turn.
_OLLAMA_TEMPLATES = {
    "chatml": ("<|im_start|>", '''{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
''', ["<|im_start|>", "<|im_end|>"], r"<\|im_start\|>system\n(.*?)<\|im_end\|>"),
    "llama3": ("<|start_header_id|>", '''{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

''', ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),
}


def chat_family(tok) -> str | None:
    """``chatml`` or ``llama3`` when the tokenizer's chat template is of that family, else ``None``."""
    template = getattr(tok, "chat_template", None) or ""
    for family, (marker, _, _, _) in _OLLAMA_TEMPLATES.items():
        if marker in template:
            return family
    return None


def modelfile(gguf_name: str, tok, adapter: str | None = None) -> str:
    """An Ollama ``Modelfile`` (``ollama create NAME -f Modelfile``).

    Args:
        gguf_name: the model's GGUF: a file name beside the Modelfile, or a path.
        tok: the tokenizer, whose chat template gives TEMPLATE, SYSTEM and the stops.
        adapter: a LoRA adapter GGUF beside the Modelfile, applied on ``gguf_name`` (``ADAPTER``).
    """
    source = gguf_name if "/" in gguf_name else f"./{gguf_name}"
    lines = ["# Ollama: ollama create NAME -f Modelfile, then ollama run NAME (written by qzo export)",
             f"FROM {source}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter}")
    family = chat_family(tok)
    if family is None:
        lines.append("# the chat template is not one qzo spells in Ollama's syntax (ChatML, Llama-3): Ollama picks one "
                     "from the GGUF's tokenizer.chat_template")
        stops = []
    else:
        _, template, stops, system_re = _OLLAMA_TEMPLATES[family]
        lines.append(f'TEMPLATE """{template}"""')
        system = _default_system_prompt(tok, system_re)
        if system:  # the template adds it when a chat has none; Ollama adds SYSTEM the same way
            lines.append(f'SYSTEM """{system}"""')
    eos = getattr(tok, "eos_token", None)
    for stop in stops + ([eos] if eos and eos not in stops else []):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def _default_system_prompt(tok, system_re: str) -> str | None:
    """The system message the chat template inserts into a chat that has none (SmolLM2's does)."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render a lone user turn has no default to find
        return None
    found = re.search(system_re, text, re.S)
    return found.group(1) if found and found.group(1).strip() else None

