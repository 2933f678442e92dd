"""model.gradient_checkpointing: same gradients, far fewer saved activations, attention kept not recomputed."""

import torch

from engine.build import build_unet
from engine.config.loader import load_config
from engine.recompute import KEPT_OPS


def _step(checkpointing: bool) -> tuple[dict, int, int]:
    """(gradients, bytes kept for backward, calls of the attention forward kernels in forward + backward)."""
    cfg = load_config(
        None, ["model.num_views=2", "data.views=[front,right]", "data.resolution=32",
               f"model.gradient_checkpointing={str(checkpointing).lower()}"],
    )  # fmt: skip
    unet = build_unet(cfg).train()
    g = torch.Generator().manual_seed(0)
    n = 4
    x, t = torch.randn(n, 8, 4, 4, generator=g), torch.randint(0, 1000, (n,), generator=g)
    ctx, cam = torch.randn(n, 1, 32, generator=g), torch.randn(n, 10, generator=g)
    saved, calls = {}, []
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    class CountAttention(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                func.overloadpacket in KEPT_OPS
            ):  # with checkpointing, its outputs live in the checkpoint's cache
                calls.append(sum(t.untyped_storage().nbytes() for t in out if isinstance(t, torch.Tensor)))
            return out

    with CountAttention():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = unet(x, t, ctx, class_labels=cam).sample.square().mean()
        loss.backward()
    kept = sum(calls) if checkpointing else 0  # KEPT_OPS are forward kernels; their backward ops differ
    return {k: p.grad for k, p in unet.named_parameters()}, sum(saved.values()) + kept, len(calls)


def test_selective_checkpointing_keeps_gradients_and_attention_saves_memory():
    plain, plain_bytes, plain_calls = _step(False)
    kept, kept_bytes, kept_calls = _step(True)
    assert plain.keys() == kept.keys()
    for name in plain:  # the recomputed forward is the same arithmetic: equal bits
        assert torch.equal(plain[name], kept[name]), f"gradient of {name} differs with checkpointing"
    assert kept_bytes * 2 <= plain_bytes, f"checkpointing saved {kept_bytes} bytes vs {plain_bytes} without"
    assert plain_calls > 0 and kept_calls == plain_calls, (
        f"attention kernels ran {kept_calls} times with checkpointing, {plain_calls} without: backward must "
        "reuse the kept outputs, not recompute them"
    )
