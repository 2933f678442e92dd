"""Per-object random streams: training randomness that does not depend on how the batch is split.

Every random draw for one object (timestep, noise, VAE sample, condition dropout, domain choice) comes from a
generator seeded by (run seed, optimizer step, slot-in-step). The slot of object i of the micro-batch that
rank r trains at micro-step k is ``j = (k*W + r)*m + i`` (W ranks, micro-batch m): the same slot the data
stream gives that object (the global order, datapipes.stream_state). So:
- resume is exact without saving any RNG state for the training step;
- the same global batch split as 2 ranks x accum 2, 1 rank x accum 4 or 4 ranks x accum 1 gives every object
  the same noise, which is what lets a run resume on another number of processes (engine.elastic) and the
  ZeRO-2 equivalence test compare world sizes.
"""

from collections.abc import Sequence

import torch

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads nearby tuples over the seed space


def first_slot(micro_step: int, rank: int, world_size: int, micro_batch: int) -> int:
    """Slot-in-step of the first object of ``rank``'s micro-batch at ``micro_step`` (0 <= slot < global batch)."""
    return (micro_step * world_size + rank) * micro_batch


def object_seed(seed: int, step: int, slot: int) -> int:
    """A 63-bit seed for the draws of the object in slot ``slot`` of optimizer step ``step``."""
    h = seed
    for part in (step, slot):
        h = (h * _MIX + part + 1) % (1 << 63)
    return h


def object_generators(seed: int, step: int, slots: Sequence[int]) -> list[torch.Generator]:
    """One generator per object, for the objects in ``slots`` (slots-in-step) of optimizer step ``step``."""
    return [torch.Generator().manual_seed(object_seed(seed, step, slot)) for slot in slots]


def randn_per_object(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """Stack of ``len(generators)`` standard normals of ``shape`` (CPU), one per object."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def rand_per_object(generators: list[torch.Generator]) -> torch.Tensor:
    """One U(0,1) draw per object, shape [B]."""
    return torch.stack([torch.rand((), generator=g) for g in generators])


def randint_per_object(generators: list[torch.Generator], high: int, count: int) -> torch.Tensor:
    """``count`` integers in [0, high) per object, shape [B, count]."""
    return torch.stack([torch.randint(0, high, (count,), generator=g) for g in generators])
