"""Per-object random streams: training randomness that does not depend on how the batch is split.

Every random draw for one object (timestep, noise, VAE sample, condition dropout, domain choice) comes from a
generator seeded by (run seed, optimizer step, micro-step, global object index). So:
- resume is exact without saving any RNG state for the training step;
- the same global batch on 1 or 2 ranks sees the same noise (the ZeRO-2 equivalence test relies on it).
"""

import torch

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads nearby tuples over the seed space


def object_seed(seed: int, step: int, micro_step: int, object_index: int) -> int:
    """A 63-bit seed for one object's draws at one (micro-)step."""
    h = seed
    for part in (step, micro_step, object_index):
        h = (h * _MIX + part + 1) % (1 << 63)
    return h


def object_generators(
    seed: int, step: int, micro_step: int, first_index: int, count: int
) -> list[torch.Generator]:
    """Generators for objects ``first_index .. first_index+count-1`` of the global micro-batch."""
    return [
        torch.Generator().manual_seed(object_seed(seed, step, micro_step, first_index + i))
        for i in range(count)
    ]


def randn_per_object(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """Stack of ``len(generators)`` standard normals of ``shape`` (CPU), one per object."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def rand_per_object(generators: list[torch.Generator]) -> torch.Tensor:
    """One U(0,1) draw per object, shape [B]."""
    return torch.stack([torch.rand((), generator=g) for g in generators])


def randint_per_object(generators: list[torch.Generator], high: int, count: int) -> torch.Tensor:
    """``count`` integers in [0, high) per object, shape [B, count]."""
    return torch.stack([torch.randint(0, high, (count,), generator=g) for g in generators])
