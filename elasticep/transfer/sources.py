"""Where a missing expert's weights can come from, and the safetensors source on disk.

Sources in order of cost, as the executor tries them for each move:

1. ``"replica"``: a slot on a live rank that holds the expert (or a local slot: a memory copy);
2. ``"host"``: a host-memory backup: this rank's own :class:`~elasticep.transfer.BackupStore`
   (a memory copy), a live peer's (planned by :func:`~elasticep.transfer.plan_backups` on other
   hosts than those serving the expert), then a :class:`~elasticep.transfer.HostBackup` process;
3. ``"disk"``: a :class:`DiskSource` over safetensors files, reading only the needed tensors.

The disk is read only for an expert whose every replica and every backup is gone or failed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["SOURCE_KINDS", "DiskSource", "TRANSFORMERS_EXPERT_KEY"]

SOURCE_KINDS = ("replica", "host", "disk")
"""Source kinds, cheapest first; the labels of the transfer metrics and ``TransferFailed.source_kind``."""

TRANSFORMERS_EXPERT_KEY = "model.layers.{layer}.mlp.experts.{expert}.{tensor}.weight"
"""The tensor key of one expert weight in a transformers DeepSeek-V3 checkpoint."""


class DiskSource:
    """Expert tensors in safetensors files (a checkpoint directory, a file, or a list of files).

    ``key_format`` names a tensor from ``layer`` (the model's layer id: the MoE layer index plus
    ``layer_offset``, e.g. DeepSeek-V3's ``first_k_dense_replace``), ``expert`` and ``tensor``.
    The index of keys is read once (from ``model.safetensors.index.json`` when present, else from
    each file's header); :meth:`read_into` then reads only the tensors of the requested expert.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        key_format: str = TRANSFORMERS_EXPERT_KEY,
        layer_offset: int = 0,
    ) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.key_format = key_format
        self.layer_offset = layer_offset
        files: list[Path]
        index: dict[str, Path] = {}
        if isinstance(paths, (str, Path)) and Path(paths).is_dir():
            root = Path(paths)
            index_file = root / "model.safetensors.index.json"
            if index_file.exists():
                weight_map = json.loads(index_file.read_text())["weight_map"]
                index = {k: root / v for k, v in weight_map.items()}
                files = sorted(set(index.values()))
            else:
                files = sorted(root.glob("*.safetensors"))
        elif isinstance(paths, (str, Path)):
            files = [Path(paths)]
        else:
            files = [Path(p) for p in paths]
        if not files:
            raise FileNotFoundError(f"no safetensors files in {paths}")
        if not index:
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():
                        index[key] = f
        self.files = files
        self._index = index

    def __repr__(self) -> str:
        return f"DiskSource({len(self.files)} files, {len(self._index)} tensors)"

    def key(self, layer: int, expert: int, tensor: str) -> str:
        return self.key_format.format(layer=layer + self.layer_offset, expert=expert, tensor=tensor)

    def has(self, layer: int, expert: int, tensors: Sequence[str]) -> bool:
        """Whether every one of ``tensors`` of ``expert`` in MoE layer ``layer`` is on disk."""
        return all(self.key(layer, expert, t) in self._index for t in tensors)

    def read_into(self, layer: int, expert: int, out: Mapping[str, torch.Tensor]) -> int:
        """Copy each tensor of the expert into ``out[name]`` (same shape and dtype); return bytes read."""
        total = 0
        for name, dst in out.items():
            key = self.key(layer, expert, name)
            path = self._index.get(key)
            if path is None:
                raise KeyError(f"{key} is not in {self}")
            with self._safe_open(str(path), framework="pt") as handle:
                src = handle.get_tensor(key)
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                raise ValueError(f"{key}: on disk {tuple(src.shape)} {src.dtype}, slot wants {tuple(dst.shape)} {dst.dtype}")
            dst.copy_(src)
            total += src.numel() * src.element_size()
        return total

    def load(self, layer: int, expert: int, tensors: Sequence[str]) -> dict[str, torch.Tensor]:
        """The expert's tensors as new CPU tensors (for checksums and host backups)."""
        out: dict[str, torch.Tensor] = {}
        for name in tensors:
            key = self.key(layer, expert, name)
            with self._safe_open(str(self._index[key]), framework="pt") as handle:
                out[name] = handle.get_tensor(key)
        return out
