"""Checkpoints that a crash can never break, and the resume that continues bit-exact.

Layout under ``run.dir/checkpoints``::

    step00000100/               DeepSpeed model + ZeRO optimizer states (DeepSpeed's own files; read only
                                through engine.safe_load: no code in a pickle runs)
        gnn3d_rank00000.safetensors  per-rank state: RNG tensors + JSON data position (engine.rank_state)
        ema.safetensors         full EMA weights (gathered from every rank's slice; written by rank 0)
        run_config.yaml         the resolved run config
    latest                      the newest complete tag (DeepSpeed's convention; zero_to_fp32 reads it)
    universal/step00000100/     made when a run resumes step00000100 (its own or another run's) on another
                                number of ranks (engine.elastic): the ZeRO state as full per-parameter
                                tensors; pruned once no kept checkpoint of this run has that tag

A save goes into ``.tmp-stepN`` and is renamed after a barrier; ``latest`` is replaced atomically last.
A kill at any moment leaves the previous checkpoint and ``latest`` intact; so does a full disk (all ranks stop
with one line, ``engine.storage.StorageFull``), and the next start removes the partial ``.tmp-stepN``.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapipes.stream_state import merge_stream_states
from engine.config import ConfigError, RunConfig
from engine.divergence import NonFiniteWeightsError, weights_finite
from engine.elastic import load_resharded, saved_world_size, universal_root
from engine.rank_state import load_rank_state, rank_file, save_rank_state, saved_data_states
from engine.safe_load import check_checkpoint_dir, only_allowed_types
from engine.storage import WriteLog, recording_deepspeed_writes

TMP_PREFIX = ".tmp-"


@dataclass
class ResumeState:
    step: int
    data_state: dict[str, Any] | None
    tag: str
    skipped_steps: int = 0  # steps DeepSpeed skipped (non-finite) before this checkpoint


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def save_checkpoint(engine: Any, run_dir: Path, step: int, *, rank: int, extra: dict[str, Any]) -> Path:
    """Collective: every rank calls it. ``extra`` holds 'data_state', 'ema' (EMA), 'config_yaml' (str),
    'skipped_steps' (int). Raises NonFiniteWeightsError, writing nothing, when any rank's weights or EMA slice
    hold NaN or infinity: every checkpoint, so ``latest`` too, is one a diverged run can go back to."""
    if not weights_finite(engine, extra["ema"]):
        raise NonFiniteWeightsError(
            f"the weights are non-finite after step {step}; its checkpoint was not written"
        )
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    tmp = TMP_PREFIX + tag
    client_state = {"gnn3d_step": step, "skipped_steps": extra.get("skipped_steps", 0)}
    # A failed write (disk full, file size limit) is recorded, not raised, until every rank has passed the
    # save's collectives; ``agree`` then stops all ranks together with one line (StorageFull).
    writes = WriteLog()
    writes.attempt(root / tmp, lambda path: path.mkdir(parents=True, exist_ok=True))
    with recording_deepspeed_writes(engine, writes):
        engine.save_checkpoint(str(root), tag=tmp, client_state=client_state, save_latest=False)
    writes.attempt(rank_file(root / tmp, rank), lambda path: save_rank_state(extra["data_state"], path))
    if extra["ema"].enabled:  # collective: every rank holds a slice of the EMA; rank 0 writes it whole
        writes.attempt(root / tmp / "ema.safetensors", lambda path: extra["ema"].save(str(path)))
    if rank == 0:
        writes.attempt(root / tmp / "run_config.yaml", lambda path: path.write_text(extra["config_yaml"]))
    previous = f"`latest` is still {read_latest(root)}" if read_latest(root) else "no checkpoint yet"
    not_saved = f"checkpoint {tag} was not saved ({previous})"
    # Also the barrier: every rank's files are on disk before the tag becomes visible.
    writes.agree(not_saved, remove_partial=root / tmp if rank == 0 else None)
    if rank == 0:
        writes.attempt(root / "latest", lambda _: _publish(root, tmp, tag))
    writes.agree(not_saved)
    return root / tag


def _publish(root: Path, tmp: str, tag: str) -> None:
    final = root / tag
    if final.exists():  # a re-save of the same step after a resume
        shutil.rmtree(final)
    os.replace(root / tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(tag)
    os.replace(pointer, root / "latest")


def remove_stale_tmp(run_dir: Path) -> list[str]:
    """Delete the ``.tmp-stepN`` saves a killed run or a full disk left (rank 0, under the run dir lock, before
    this run writes): they are never a checkpoint, and the room they take may be what the next save needs."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    stale = sorted(p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX))
    for name in stale:
        shutil.rmtree(root / name, ignore_errors=True)
    return stale


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[str]:
    """Delete complete checkpoints older than the newest ``keep_last`` and stale temporary saves (rank 0)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    latest = read_latest(root)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    doomed = [t for t in tags[:-keep_last] if t != latest]
    doomed += [p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for name in doomed:
        shutil.rmtree(root / name, ignore_errors=True)
    # A re-sharding copy (engine.elastic) is kept only while its checkpoint is; one of another run's checkpoint
    # goes once this run has checkpoints of its own.
    kept = set(tags) - set(doomed)
    converted = universal_root(root)
    for path in converted.iterdir() if converted.is_dir() else []:
        if path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_latest(root: Path) -> str | None:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def find_resume_dir(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """Resolve ``run.resume`` to (checkpoints root, tag), or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        tag = read_latest(root)
        return (root, tag) if tag else None
    path = Path(resume)
    if (path / "latest").is_file():  # a checkpoints root
        return path, read_latest(path)
    if (path / "checkpoints" / "latest").is_file():  # a run directory
        return path / "checkpoints", read_latest(path / "checkpoints")
    if path.is_dir() and path.name.startswith("step"):  # one tag directory
        return path.parent, path.name
    raise ConfigError(
        f"no checkpoint found at {path} (want a run dir, its checkpoints/, or a step dir)", key="run.resume"
    )


# Keys that change the UNet's parameters or the meaning of its inputs: a resume must not change them.
ARCHITECTURE_KEYS = (
    "model.num_views", "model.multiview_attention", "model.sparse_mv_attention", "model.rowwise_mv_attention",
    "model.cd_attention_mid", "model.cd_attention_last", "model.block_out_channels", "model.layers_per_block",
    "model.attention_head_dim", "model.cross_attention_dim", "model.pretrained", "model.unet", "data.resolution",
    "data.views", "data.mode", "train.trainable",
)  # fmt: skip


def check_same_architecture(saved: RunConfig, current: RunConfig, *, source: str) -> None:
    """Refuse to resume a checkpoint whose architecture keys differ from the run config's, naming them."""
    diffs = []
    for key in ARCHITECTURE_KEYS:
        section, name = key.split(".")
        before, now = getattr(getattr(saved, section), name), getattr(getattr(current, section), name)
        if before != now:
            diffs.append(f"{key}: checkpoint {before!r}, run config {now!r}")
    if diffs:
        raise ConfigError(
            "cannot resume with a different architecture: " + "; ".join(diffs) + ". Set these back, or start "
            "a new run.dir (model.unet=<old run> starts from its weights)",
            key="run.resume",
            source=source,
        )


def load_checkpoint(
    engine: Any, root: Path, tag: str, *, rank: int, world_size: int, ema: Any, run_dir: Path
) -> ResumeState:
    """Collective: restore engine (weights, optimizer, LR schedule), EMA, RNG and this rank's data position.

    ``engine.preflight.check_resume`` has already refused a checkpoint this run cannot continue (architecture,
    seed, global batch, a v0.1 data position). Another world size re-shards the ZeRO state
    (``engine.elastic``; the engine was built with ``with_universal_load``); the data position is always the
    merge of every saved rank's state, so it fits any new world size, micro-batch or worker count.
    """
    check_checkpoint_dir(root / tag)  # every rank, every file: all refuse together before anything loads
    if saved_world_size(root / tag) not in (0, world_size):  # re-sharded through the universal layout
        client = load_resharded(engine, root, tag, rank=rank, out_root=checkpoint_root(run_dir))
    else:
        with only_allowed_types():  # DeepSpeed unpickles with weights_only=False: no code runs from its files
            _, client = engine.load_checkpoint(
                str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    if client is None:
        raise ConfigError(f"DeepSpeed could not load {root / tag}", key="run.resume")
    load_rank_state(root / tag, rank)  # this rank's RNG, when the checkpoint had this rank
    data_state = merge_stream_states(saved_data_states(root / tag), rank)
    if ema.enabled and (root / tag / "ema.safetensors").is_file():
        ema.load(str(root / tag / "ema.safetensors"))
    skipped = int(client.get("skipped_steps", 0))
    return ResumeState(step=int(client["gnn3d_step"]), data_state=data_state, tag=tag, skipped_steps=skipped)
