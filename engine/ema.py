"""Exponential moving average of the trainable UNet weights, fed from DeepSpeed's fp32 master copy.

Under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) the optimizer of each rank owns one flat slice of the fp32
master weights, and one parameter may be split between ranks. The EMA follows the same split: each rank
averages only the elements it owns (DeepSpeed's per-parameter ``_hp_mapping`` says which), so EMA memory per
rank falls with the world size, and the average is taken of the fp32 master, not of the bf16 module weights.
``gather`` reassembles full tensors (a collective) for saving, validation and export.

Without such an optimizer (fp32, no ZeRO) the module weights are the master, and every rank keeps them whole.
"""

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


class EMAFileError(RuntimeError):
    """An ``ema.safetensors`` that does not hold exactly the run's trainable parameters."""


def warm_decay(decay: float, updates: int) -> float:
    """Decay of the ``updates``-th update: ramps up as (1+n)/(10+n) before reaching ``decay`` (as DiT/diffusers)."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA:
    """fp32 average of this rank's slice of the master weights; ``decay`` 0 disables it (and keeps no copy).

    ``engine`` is the DeepSpeed engine (anything with ``.module`` and ``.optimizer``). ``shadow`` maps a
    parameter name to this rank's flat fp32 slice of it; a rank that owns none of a parameter has no entry.
    """

    def __init__(self, engine: Any, decay: float, every: int = 1):
        self.decay, self.every, self.updates = decay, every, 0
        self._params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        # DeepSpeed's ZeRO-1/2 and bf16 optimizers link every parameter to its slice of the fp32 master.
        self._partitioned = hasattr(engine.optimizer, "_link_all_hp_params")
        self.shadow: dict[str, Tensor] = {}
        self._start: dict[str, int] = {}  # where the slice begins in the flattened parameter
        if self.enabled:
            for name, start, master in self._master_slices():
                self.shadow[name] = master.detach().float().clone()
                self._start[name] = start

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def _master_slices(self) -> Iterator[tuple[str, int, Tensor]]:
        """(name, start, flat fp32 master slice) of every trainable parameter this rank owns a part of."""
        for name, param in self._params.items():
            if not self._partitioned:
                yield name, 0, param.detach().reshape(-1)
                continue
            # Looked up on every call: DeepSpeed re-links the mapping when it loads a checkpoint.
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                yield name, mapping.lp_fragment_address.start, mapping.hp_fragment

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend the current master weights in after optimizer step ``step`` (1-based), every ``every`` steps."""
        if not self.enabled or step % self.every:
            return
        self.updates += 1
        weight = 1.0 - warm_decay(self.decay, self.updates)
        for name, start, master in self._master_slices():
            if self._start.get(name) != start:
                raise RuntimeError(f"the optimizer's partition of {name} moved; the EMA cannot follow it")
            self.shadow[name].lerp_(master.float(), weight)

    def local_numel(self) -> int:
        """Elements of the EMA held by this rank."""
        return sum(t.numel() for t in self.shadow.values())

    @torch.no_grad()
    def gather(self) -> dict[str, Tensor] | None:
        """Collective: full fp32 EMA tensors by parameter name on rank 0, None on the other ranks."""
        is_main = not dist.is_initialized() or dist.get_rank() == 0
        if not self._partitioned or not dist.is_initialized() or dist.get_world_size() == 1:
            if not is_main:
                return None
            return {n: self.shadow[n].view(p.shape).cpu().clone() for n, p in self._params.items()}
        full = {}
        for name, param in self._params.items():  # the same order on every rank
            buffer = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            if name in self.shadow:
                buffer.narrow(0, self._start[name], self.shadow[name].numel()).copy_(self.shadow[name])
            dist.reduce(buffer, dst=0)  # the slices are disjoint: their sum is the whole tensor, exactly
            if is_main:
                full[name] = buffer.view(param.shape).cpu()
        return full if is_main else None

    def save(self, path: str) -> None:
        """Collective: rank 0 writes the full tensors by name (the format export and validation read)."""
        full = self.gather()
        if full is not None:
            save_file(full, path, metadata={"updates": str(self.updates), "decay": str(self.decay)})

    @torch.no_grad()
    def load(self, path: str) -> None:
        """Every rank reads the full tensors of ``path`` and keeps its own slices."""
        with safe_open(path, "pt") as f:
            names = set(f.keys())
            if names != set(self._params):
                missing, unexpected = sorted(set(self._params) - names), sorted(names - set(self._params))
                raise EMAFileError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
            for name, slice_ in self.shadow.items():
                full = f.get_tensor(name).reshape(-1)
                slice_.copy_(full.narrow(0, self._start[name], slice_.numel()))
            self.updates = int(f.metadata()["updates"])
