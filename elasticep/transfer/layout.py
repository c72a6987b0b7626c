"""Where each expert's weight tensors live: the layout of per-rank expert buffers.

An MoE engine keeps, per layer and per weight tensor (gate, up and down projections), one buffer
of ``[slots_per_rank, *shape]``: physical slot ``s`` of layer ``l`` lives on rank
``s // slots_per_rank`` at index ``s % slots_per_rank`` of each of that layer's buffers. These
buffers are what every rank registers with the transfer engine and announces in its
:class:`~elasticep.events.TransferEndpoint` (buffer name -> ``(address, nbytes)``).

:class:`ExpertLayout` is the pure map ``(layer, slot, tensor) -> Extent(rank, buffer, offset,
nbytes)``; :class:`ExpertWeights` holds one rank's buffers (allocated here in one arena, or the
engine's own tensors) and gives typed views of each expert.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

__all__ = ["ExpertLayout", "ExpertTensor", "ExpertWeights", "Extent", "expert_crc32"]


@dataclass(frozen=True)
class ExpertTensor:
    """One weight tensor of an expert: ``name`` (e.g. ``"gate_proj"``), ``shape`` and ``dtype``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Extent:
    """A byte range of a named buffer on ``rank``: ``nbytes`` bytes from ``offset``."""

    rank: int
    buffer: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertLayout:
    """The shape of every rank's expert buffers.

    ``num_layers`` MoE layers (numbered from 0; a disk source maps them to the model's layer
    ids), ``slots_per_rank`` physical slots per rank and per layer, and the weight ``tensors``
    of one expert, in the order they are moved and checksummed.
    """

    num_layers: int
    slots_per_rank: int
    tensors: tuple[ExpertTensor, ...]
    _by_name: dict[str, ExpertTensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_layers <= 0 or self.slots_per_rank <= 0 or not self.tensors:
            raise ValueError("a layout needs layers, slots and at least one tensor")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names) or any("." in n or "/" in n for n in names):
            raise ValueError(f"tensor names must be unique and contain no '.' or '/': {names}")
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    @classmethod
    def deepseek(
        cls,
        *,
        num_layers: int,
        slots_per_rank: int,
        hidden_size: int,
        moe_intermediate_size: int,
        dtype: torch.dtype = torch.bfloat16,
    ) -> "ExpertLayout":
        """The DeepSeek-V3 / transformers expert: gate and up ``[inter, hidden]``, down ``[hidden, inter]``."""
        h, i = hidden_size, moe_intermediate_size
        return cls(
            num_layers,
            slots_per_rank,
            (
                ExpertTensor("gate_proj", (i, h), dtype),
                ExpertTensor("up_proj", (i, h), dtype),
                ExpertTensor("down_proj", (h, i), dtype),
            ),
        )

    def with_slots(self, slots_per_rank: int) -> "ExpertLayout":
        """The same experts with another slot count (a host backup holds one slot per logical expert)."""
        return replace(self, slots_per_rank=slots_per_rank)

    def tensor(self, name: str) -> ExpertTensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no expert tensor named {name!r}; layout has {list(self._by_name)}") from None

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's weights (all its tensors) in one layer."""
        return sum(t.nbytes for t in self.tensors)

    @staticmethod
    def buffer_name(layer: int, tensor: str) -> str:
        """Name of the buffer holding ``tensor`` of every local slot of ``layer``, e.g. ``"L3.down_proj"``."""
        return f"L{layer}.{tensor}"

    @staticmethod
    def parse_buffer_name(name: str) -> tuple[int, str] | None:
        """``(layer, tensor)`` of a buffer name made by :meth:`buffer_name`, else ``None``."""
        head, _, tensor = name.partition(".")
        if not head.startswith("L") or not tensor or not head[1:].isdigit():
            return None
        return int(head[1:]), tensor

    def buffer_nbytes(self, tensor: str) -> int:
        return self.slots_per_rank * self.tensor(tensor).nbytes

    def rank_of(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def locate(self, layer: int, slot: int, tensor: str) -> Extent:
        """Where physical ``slot``'s ``tensor`` of ``layer`` lives (slot numbered across all ranks)."""
        if not 0 <= layer < self.num_layers or slot < 0:
            raise IndexError(f"layer {layer} / slot {slot} out of range")
        t = self.tensor(tensor)
        local = slot % self.slots_per_rank
        return Extent(slot // self.slots_per_rank, self.buffer_name(layer, tensor), local * t.nbytes, t.nbytes)


def _contiguous_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().view(torch.uint8).numpy()).cast("B")


def expert_crc32(tensors: Iterable[torch.Tensor]) -> int:
    """CRC-32 of an expert's tensors' bytes, concatenated in layout order (CPU tensors)."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(_contiguous_bytes(t.reshape(-1)), crc)
    return crc


class ExpertWeights:
    """One rank's (or one host backup's) expert buffers for the layers it holds.

    ``buffers`` maps :meth:`ExpertLayout.buffer_name` to a contiguous CPU tensor of
    ``[slots_per_rank, *shape]`` and the layout's dtype, e.g. the engine's own weight tensors;
    :meth:`allocate` makes them as views of one zeroed arena, so one registration covers all.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        buffers: Mapping[str, torch.Tensor],
        *,
        arena: torch.Tensor | None = None,
    ) -> None:
        self.layout = layout
        self.buffers: dict[str, torch.Tensor] = dict(buffers)
        self.arena = arena
        layers = set()
        for name, buf in self.buffers.items():
            parsed = layout.parse_buffer_name(name)
            if parsed is None:
                raise ValueError(f"buffer name {name!r} is not a layout buffer name")
            layer, tensor = parsed
            spec = layout.tensor(tensor)
            want = (layout.slots_per_rank, *spec.shape)
            if tuple(buf.shape) != want or buf.dtype != spec.dtype:
                raise ValueError(f"buffer {name}: {tuple(buf.shape)} {buf.dtype}, expected {want} {spec.dtype}")
            if not buf.is_contiguous() or buf.device.type != "cpu":
                raise ValueError(f"buffer {name} must be a contiguous CPU tensor")
            layers.add(layer)
        for layer in layers:
            missing = [t.name for t in layout.tensors if layout.buffer_name(layer, t.name) not in self.buffers]
            if missing:
                raise ValueError(f"layer {layer} lacks buffers for {missing}")
        self.layers: tuple[int, ...] = tuple(sorted(layers))

    @classmethod
    def allocate(cls, layout: ExpertLayout, layers: Sequence[int] | None = None) -> "ExpertWeights":
        """Zeroed buffers for ``layers`` (default all), carved from one ``uint8`` arena."""
        layers = list(range(layout.num_layers)) if layers is None else sorted(set(layers))
        # Keep every buffer 64-byte aligned inside the arena.
        sizes = [(-(-layout.buffer_nbytes(t.name) // 64)) * 64 for t in layout.tensors]
        arena = torch.zeros(len(layers) * sum(sizes), dtype=torch.uint8)
        buffers: dict[str, torch.Tensor] = {}
        offset = 0
        for layer in layers:
            for t, size in zip(layout.tensors, sizes):
                n = layout.buffer_nbytes(t.name)
                view = arena[offset : offset + n].view(t.dtype).view(layout.slots_per_rank, *t.shape)
                buffers[layout.buffer_name(layer, t.name)] = view
                offset += size
        return cls(layout, buffers, arena=arena)

    def tensor(self, layer: int, local_slot: int, name: str) -> torch.Tensor:
        """The typed view of ``name`` of local slot ``local_slot`` in ``layer`` (shape of the tensor)."""
        return self.buffers[self.layout.buffer_name(layer, name)][local_slot]

    def expert(self, layer: int, local_slot: int) -> dict[str, torch.Tensor]:
        """All tensors of one local slot, by name, in layout order."""
        return {t.name: self.tensor(layer, local_slot, t.name) for t in self.layout.tensors}

    def address(self, layer: int, local_slot: int, name: str) -> tuple[int, int]:
        """``(address, nbytes)`` of one tensor of one local slot, for the transfer engine."""
        t = self.tensor(layer, local_slot, name)
        return t.data_ptr(), t.numel() * t.element_size()

    def checksum(self, layer: int, local_slot: int) -> int:
        """:func:`expert_crc32` of one local slot."""
        return expert_crc32(self.expert(layer, local_slot).values())

    def regions(self) -> list[tuple[int, int]]:
        """``(address, nbytes)`` memory regions to register: the arena, or each buffer."""
        if self.arena is not None:
            return [(self.arena.data_ptr(), self.arena.numel())]
        return [(b.data_ptr(), b.numel() * b.element_size()) for b in self.buffers.values()]

    def endpoint_buffers(self) -> dict[str, tuple[int, int]]:
        """Buffer name -> ``(address, nbytes)``, as a :class:`~elasticep.events.TransferEndpoint` carries."""
        return {n: (b.data_ptr(), b.numel() * b.element_size()) for n, b in self.buffers.items()}
