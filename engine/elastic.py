"""Resume on another number of processes: DeepSpeed's universal checkpoint re-shards the ZeRO-2 state.

A ZeRO-2 checkpoint holds one flat slice of the fp32 master weights and Adam moments per rank, cut for the
world size that wrote it. On a world-size change, rank 0 converts the checkpoint once into DeepSpeed's
universal layout (this run's ``checkpoints/universal/stepN/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``:
full per-parameter tensors, plus a copy of the model-states file with the LR scheduler and our client state), and
every rank then loads it with ``"checkpoint": {"load_universal": true}``, which cuts the slices of the new
world size. The conversion is written to a temporary folder and renamed, so a killed conversion is never
picked up; a finished one is reused. It lives outside the tag folder because DeepSpeed's checkpoint readers
walk the tag folder recursively.

Every pickle the conversion and the load read goes through ``engine.safe_load`` (weights_only=True and the
allow-list). The same world size never comes here: it keeps DeepSpeed's own bit-exact load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from engine.config import ConfigError
from engine.safe_load import check_checkpoint_dir, only_allowed_types

UNIVERSAL_DIR = "universal"


class ReshardError(ConfigError):
    """The checkpoint could not be converted for another world size (names the checkpoint)."""


_OPTIM_GLOB = "*zero_pp_rank_*_mp_rank_*_optim_states.pt"


def saved_world_size(tag_dir: Path) -> int:
    """Data-parallel ranks that wrote this DeepSpeed checkpoint (one ZeRO optimizer file each)."""
    return len(list(tag_dir.glob(_OPTIM_GLOB)))


def needs_reshard(found: tuple[Path, str] | None, world_size: int) -> bool:
    """True when the checkpoint to resume was written by another number of ranks."""
    return found is not None and saved_world_size(found[0] / found[1]) not in (0, world_size)


def with_universal_load(ds: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config that loads universal checkpoints (must be set before ``deepspeed.initialize``)."""
    return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def universal_root(root: Path) -> Path:
    return root / UNIVERSAL_DIR


def convert_to_universal(root: Path, tag: str, out_root: Path) -> Path:
    """Write (once) the universal form of checkpoint ``root/tag`` under ``out_root/universal``; returns its
    folder. Rank 0 only."""
    final = universal_root(out_root) / tag
    if final.is_dir():
        return final
    tmp = universal_root(out_root) / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that was killed
    tmp.mkdir(parents=True)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(root / tag), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,  # no tensor parallel: plain info
    )  # fmt: skip
    # One process (no pool: its workers would not inherit the guarded torch.load); its chatter stays quiet.
    with only_allowed_types(), contextlib.redirect_stdout(io.StringIO()), _quiet_tqdm():
        ds_to_universal(args)
    os.replace(tmp, final)
    # The converter also points universal/latest_universal at its output (our temporary name): we always
    # load by tag, so a stale pointer is only misleading.
    (universal_root(out_root) / "latest_universal").unlink(missing_ok=True)
    return final


@contextlib.contextmanager
def _quiet_tqdm():
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def load_resharded(engine: Any, root: Path, tag: str, *, rank: int, out_root: Path) -> dict[str, Any] | None:
    """Collective: rank 0 converts, every rank loads its new slices; returns DeepSpeed's client state.

    ``out_root``: this run's checkpoints folder (writable even when ``root`` is another run's), where the
    conversion is kept until this run's checkpoints make it unneeded (``engine.checkpoint.prune_checkpoints``).
    """
    failure = [None]
    if rank == 0:
        try:
            convert_to_universal(root, tag, out_root)
        except Exception as error:  # every rank must learn it, or they wait in the broadcast forever
            failure[0] = f"{type(error).__name__}: {error}"
    dist.broadcast_object_list(failure, src=0)  # also the barrier: the folder is complete before any read
    if failure[0] is not None:
        raise ReshardError(f"{root / tag}: converting to the universal layout failed ({failure[0]})")
    folder = universal_root(out_root) / tag
    check_checkpoint_dir(folder)
    with only_allowed_types():
        _, client = engine.load_checkpoint(
            str(universal_root(out_root)), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    return client
