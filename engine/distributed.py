"""Process-group setup for every way gnn3d is launched: deepspeed, torchrun, or plain ``python``."""

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on loopback (for single-process rendezvous and tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_single_process_env() -> None:
    """Without a launcher, DeepSpeed would look for MPI; give it a one-process rendezvous instead."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (nccl on CUDA, gloo on CPU) and pick the device."""
    import deepspeed

    ensure_single_process_env()
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)
