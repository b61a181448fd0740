"""Streaming 4-bit offload: decoder layers that do not fit stay *packed* and are copied in per forward.

accelerate offloads bitsandbytes layers unquantized: a 70B would need ~120 GB of bf16 in host
RAM and stream 4x the bytes. Here a layer that does not fit keeps its 4-bit codes, in CPU
memory (pinned, when a GPU runs the model) or in a file of packed weights on disk
(``model.offload_folder``), and only those bytes move: right before the layer's forward they
are copied to the execution device, and right after it they are dropped. The next streamed
layer's copy is started as soon as the current one arrives (a side stream on CUDA, a reader
thread from disk), so it overlaps the current layer's compute; at most two streamed layers
are materialized at a time. No 16-bit copy of an offloaded layer exists anywhere.

What stays resident: everything but the streamed layers' 4-bit weight codes: their
quantization state (the block scales, what ``qzo.scales`` trains), norms, biases, and the
LoRA adapters peft later adds to them, all on the execution device, where ZO perturbs them.
The bytes copied back are the bytes that were stored, so a streamed model computes exactly
what it computes in memory (tested: identical losses and trained values).

Which layers stream comes from ``device_map`` / ``max_memory`` with their usual meaning: a
dict that puts ``model.layers.N`` on ``"disk"`` (or on ``"cpu"`` when a GPU executes), or
``"auto"`` with a ``max_memory`` the quantized model does not fit (sized by its quantized
bytes, :func:`qzo.load.quantized_device_map`). Other modules such a map sends away (a final
norm, say) are small and stay resident.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QzoError
from .bnb import four_bit_linears, packed_codes, set_packed_codes

__all__ = ["StreamPlan", "plan_streaming", "attach_streaming", "StreamedLayers", "streamed_layers"]


@dataclass
class StreamPlan:
    """Which decoder layers stream, from where (``"cpu"`` memory or ``"disk"``), onto which device."""

    layers: dict[int, str]
    device: torch.device

    def describe(self) -> str:
        where = sorted(set(self.layers.values()))
        return f"{len(self.layers)} decoder layers stream packed 4-bit weights from {' and '.join(where)}"


def _layer_index(module_name: str) -> int | None:
    parts = module_name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def plan_streaming(device_map, resolve_auto, num_layers) -> StreamPlan | None:
    """The layers a 4-bit load streams, or ``None`` when everything fits where it runs.

    ``device_map`` is what the user gave (``"auto"``, a dict, ``"cpu"``); ``resolve_auto()``
    returns accelerate's map sized by quantized bytes (called only for ``"auto"``), and
    ``num_layers()`` the decoder's depth (for a map that sends the whole model or all its
    layers away: then every layer streams and the small rest stays resident).
    """
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if device_map == "auto":
        device_map = resolve_auto()
    if not isinstance(device_map, dict):
        return None
    away = ("disk", "cpu") if gpu else ("disk",)
    layers: dict[int, str] = {}
    for name, where in device_map.items():
        index = _layer_index(str(name))
        where = str(where)
        if where in away and index is not None:
            layers[index] = where
        elif index is None and name in ("", "model", "model.layers") and where in away:
            layers.update({i: where for i in range(num_layers())})
    if not layers:
        return None
    return StreamPlan(layers, device)


def decoder_layers(model) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise QzoError(f"streaming offload needs a decoder with model.layers ({type(base).__name__} has none); load "
                       "it without offload or with model.quant: none")
    return layers


class StreamedLayers:
    """The streamed decoder layers of one model and the hooks that copy their codes in and out.

    ``bytes_streamed`` counts the packed bytes copied to the device (for the benchmark and
    the planner check); ``stored_bytes`` is what the store holds.
    """

    def __init__(self, model, plan: StreamPlan, folder: str | Path | None):
        self.plan, self.device = plan, plan.device
        self.layers = decoder_layers(model)
        missing = [i for i in plan.layers if i >= len(self.layers)]
        if missing:
            raise QzoError(f"device_map offloads model.layers.{missing[0]}, but the model has {len(self.layers)} layers")
        if "disk" in plan.layers.values() and folder is None:
            raise QzoError("some decoder layers go to disk, but no folder was given for their packed weights: set "
                           "model.offload_folder (qzo.load(..., offload_folder=...)) or raise model.max_memory")
        self.folder = Path(folder) / "qzo-packed" if folder is not None else None
        self.order = sorted(plan.layers)
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._index: dict[int, dict[str, tuple[int, tuple[int, ...]]]] = {}  # disk: name -> (offset, shape)
        self._modules: dict[int, dict[str, torch.nn.Module]] = {}
        self._pending: dict[int, Future | tuple] = {}
        self._buffers: list[torch.Tensor] = []
        self._hooks: list = []
        self._reads = 0
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qzo-stream")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.bytes_streamed = 0
        self.stored_bytes = 0
        empty = torch.empty(0, dtype=torch.uint8)
        for i in self.order:
            linears = four_bit_linears(self.layers[i])
            if not linears:
                raise QzoError(f"model.layers.{i} has no 4-bit layers to stream; offload it with model.quant: none")
            self._modules[i] = dict(linears)
            packed = {name: packed_codes(m).contiguous() for name, m in linears}
            self.stored_bytes += sum(t.numel() * t.element_size() for t in packed.values())
            if plan.layers[i] == "disk":
                self.folder.mkdir(parents=True, exist_ok=True)
                self._index[i] = _write_packed(self._path(i), packed)
            else:
                self._memory[i] = {k: v.pin_memory() if self._copy_stream is not None else v for k, v in packed.items()}
            for m in self._modules[i].values():
                set_packed_codes(m, empty.to(self.device))  # the codes now live in the store only
            self._hooks += [self.layers[i].register_forward_pre_hook(self._fetch_hook(i)),
                            self.layers[i].register_forward_hook(self._release_hook(i))]
        if self.device.type == "cuda":
            model.to(self.device)  # the rest (resident layers, scales, norms) runs on the GPU

    def _path(self, i: int) -> Path:
        return self.folder / f"layer-{i:05d}.bin"

    def _buffer(self, slot: int | None) -> torch.Tensor | None:
        """One of the two host buffers disk reads alternate between (``None``: a fresh one, for good)."""
        if slot is None:
            return None
        if not self._buffers:
            size = max(self._path(i).stat().st_size for i in self.order if self.plan.layers[i] == "disk")
            pin = self.device.type == "cuda"
            self._buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        return self._buffers[slot]

    def _read(self, i: int, slot: int | None = None) -> dict[str, torch.Tensor]:
        """Layer ``i``'s packed codes on the execution device (runs in the reader thread).

        From disk they land in host buffer ``slot``: reads alternate between two buffers
        allocated once, since at most two streamed layers are alive (the one computing, the
        one read ahead), so a stream of reads never grows the heap.
        """
        if self.plan.layers[i] == "disk":
            host = _read_packed(self._path(i), self._index[i], self._buffer(slot))
        else:
            host = self._memory[i]
        if self.device.type != "cuda":
            return host
        with torch.cuda.stream(self._copy_stream):
            on_device = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        if slot is not None and self.plan.layers[i] == "disk":
            event.synchronize()  # this thread waits, not the compute: the buffer is reused two reads on
        return on_device, event

    def _start(self, i: int) -> None:
        with self._lock:
            if i not in self._pending:
                slot, self._reads = self._reads % 2, self._reads + 1
                self._pending[i] = self._reader.submit(self._read, i, slot)

    def _next(self, i: int) -> int:
        k = self.order.index(i)
        return self.order[(k + 1) % len(self.order)]  # after the last comes the first, of the next forward

    def _fetch_hook(self, i: int):
        def fetch(module, args):
            with self._lock:  # a read ahead the model did not ask for (a forward cut short): drop it first,
                stale = [self._pending.pop(k) for k in list(self._pending) if k != i]  # its buffer is reused
            for future in stale:
                future.result()
            self._start(i)
            with self._lock:
                future = self._pending.pop(i)
            got = future.result()
            if self.device.type == "cuda":
                got, event = got
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                for t in got.values():
                    # allocated on the copy stream: without this, the allocator could hand the block to the
                    # next read-ahead's copy while this layer's kernels (queued, not yet run) still read it
                    t.record_stream(compute)
            for name, m in self._modules[i].items():
                set_packed_codes(m, got[name])
                self.bytes_streamed += got[name].numel() * got[name].element_size()
            nxt = self._next(i)
            if nxt != i:
                self._start(nxt)  # overlaps this layer's compute
        return fetch

    def _release_hook(self, i: int):
        empty = torch.empty(0, dtype=torch.uint8, device=self.device)

        def release(module, args, output):
            for m in self._modules[i].values():
                set_packed_codes(m, empty)
        return release

    def materialize(self) -> None:
        """Put every streamed layer's codes back in place, for good (export, merge); streaming stops."""
        for i in self.order:
            got = self._read(i)
            if self.device.type == "cuda":
                got, event = got
                event.synchronize()
            for name, m in self._modules[i].items():
                set_packed_codes(m, got[name])
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _write_packed(path: Path, packed: dict[str, torch.Tensor]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """One layer's codes as raw bytes, back to back; returns where each tensor starts and its shape.

    Raw bytes rather than safetensors: reading them back with ``readinto`` into one fresh
    buffer copies once and maps nothing, so a streamed layer costs its size in RAM while it
    is in use and not a byte more (a memory-mapped file would add its pages on top).
    """
    index, offset = {}, 0
    with open(path, "wb") as f:
        for name, t in packed.items():
            data = t.contiguous().view(torch.uint8).reshape(-1).numpy()
            f.write(memoryview(data))
            index[name] = (offset, tuple(t.shape))
            offset += data.nbytes
    return index


def _read_packed(path: Path, index: dict[str, tuple[int, tuple[int, ...]]],
                 into: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8) if into is None else into[:size]
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(memoryview(buf.numpy()))
    if got != size:
        raise QzoError(f"{path} is shorter than the layer it holds ({got} of {size} bytes): the offload folder "
                       "was changed while the model was loaded; load it again")
    out = {}
    for name, (offset, shape) in index.items():
        n = 1
        for d in shape:
            n *= d
        out[name] = buf[offset:offset + n].view(shape)
    return out


def attach_streaming(model, plan: StreamPlan, folder) -> StreamedLayers:
    """Stream ``plan``'s layers of a model loaded whole (quantized, on CPU); the handle is ``model.qzo_streamed``."""
    streamed = StreamedLayers(model, plan, folder)
    model.qzo_streamed = streamed
    return streamed


def streamed_layers(model) -> StreamedLayers | None:
    """The streaming handle of a model (or of the base of a peft model), ``None`` when nothing streams."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "qzo_streamed", None) or getattr(model, "qzo_streamed", None)
