"""Exponential moving average of the UNet weights, kept in fp32 beside the engine."""

import torch
from safetensors.torch import load_file, save_file


class EMA:
    """fp32 shadow copy of the trainable parameters; ``decay`` 0 disables it.

    Under ZeRO-2 every rank holds the full parameters, so every rank updates an identical copy and any rank
    can validate or export with it.
    """

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1):
        self.decay, self.every, self.updates = decay, every, 0
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Blend the current weights in, every ``every`` optimizer steps."""
        if not self.enabled or step % self.every:
            return
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # warm start, as DiT/diffusers do
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the EMA weights into ``model`` (its dtype)."""
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def save(self, path: str) -> None:
        save_file(self.shadow, path, metadata={"updates": str(self.updates), "decay": str(self.decay)})

    def load(self, path: str) -> None:
        from safetensors import safe_open

        self.shadow = load_file(path)
        with safe_open(path, "pt") as f:
            self.updates = int(f.metadata()["updates"])
