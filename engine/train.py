"""The training run: set up once, then ``run_step`` until ``run.max_steps``, with hooks around it.

Reads top to bottom: distributed init → the demo's data and VAE (CPU demo only, made an ordinary config) →
preflight checks → run dir → data → components and UNet → DeepSpeed engine → resume → loop (step, log,
checkpoint, validate) → final checkpoint and validation.
"""

import hashlib
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from datapipes.latent_stream import build_latent_train_loader
from datapipes.sample import SampleError
from datapipes.shards import StreamError, build_train_loader, build_val_loader
from datapipes.transform import TransformOptions
from engine.build import build_components, build_unet, in_training_precision
from engine.checkpoint import load_checkpoint, prune_checkpoints, remove_stale_tmp, save_checkpoint
from engine.compile import compile_unet
from engine.config import (
    ConfigError,
    RunConfig,
    check_trainable_stage,
    config_to_dict,
    resolve_ds_config,
    save_config,
    save_ds_config,
)
from engine.data_loss import EXIT_DATA_LOSS, DataLoss, DataLossError
from engine.demo import prepare_demo
from engine.distributed import EXIT_UNAVAILABLE, DistInfo, RendezvousFailed, init_distributed
from engine.divergence import (
    EXIT_DIVERGED,
    DivergedError,
    NonFiniteWeightsError,
    SkippedSteps,
    check_skips_nonfinite_gradients,
    last_good_checkpoint,
)
from engine.elastic import needs_reshard, with_universal_load
from engine.ema import EMA
from engine.encoding import encoder_identity
from engine.liveness import Liveness, resume_hint
from engine.objective import DiffusionObjective, domain_means
from engine.optim import build_optimizer, describe_trainable, lr_lambda, param_groups, select_trainable
from engine.preempt import EXIT_PREEMPTED, Preemption
from engine.preflight import check_latents_encoder, check_run, pixel_shards
from engine.randomness import first_slot, object_generators
from engine.rundir import RunDirRefused, lock_run_dir
from engine.sample_log import SampleLog
from engine.startup import STARTUP
from engine.storage import EXIT_STORAGE, STORAGE_ADVICE, StorageFull, as_storage_full
from engine.threads import apply_threads
from engine.throughput import Throughput
from engine.tracking import IntervalMeans, Tracker
from engine.validation import run_validation, validation_weights
from modeling.components import save_components


@dataclass
class Run:
    """Everything the loop needs, built once by ``setup``."""

    cfg: RunConfig
    info: DistInfo
    run_dir: Path
    engine: object
    ema: EMA
    objective: DiffusionObjective
    components: object
    loader: object
    train_shards: str
    start_step: int = 0
    val_batch: dict | None = field(default=None, repr=False)
    validate: bool = True  # False only when the validation split is empty (allowed with validation.every=0)
    skipped: SkippedSteps = field(default_factory=SkippedSteps)
    last_checkpoint: Path | None = None  # newest checkpoint this run saved or resumed from (finite weights)
    samples: SampleLog | None = None  # logging.sample_ids: the object ids of every micro-step


def train(cfg: RunConfig, ds_config: dict, ds_path: str) -> int:
    """Entry point of ``launcher/train.py``; returns the process exit code."""
    try:
        info = init_distributed(cfg.run.rendezvous_timeout_s, cfg.run.collective_timeout_s)
    except RendezvousFailed as err:  # a node that never came: every started rank says so in one line
        print(f"[rank {err.rank}] {err}", file=sys.stderr, flush=True)
        return EXIT_UNAVAILABLE
    threads = apply_threads(cfg.run.threads_per_rank)
    if info.is_main:
        print(threads, flush=True)
    STARTUP.lap("distributed")
    preemption = Preemption(cfg.checkpoint.preempt_grace_s, info.rank).install()
    lock = liveness = None
    try:
        liveness = Liveness.start(info.rank, info.world_size, cfg.run.collective_timeout_s, cfg.run.dir)
        # Before anything is written (the demo may save components into run.dir): one run per run dir.
        lock = lock_run_dir(cfg, is_main=info.is_main, world_size=info.world_size)
        STARTUP.lap("run dir lock")
        cfg = prepare_demo(cfg, local_rank=info.local_rank, world_size=info.world_size, device=info.device)
        STARTUP.lap("demo")
        run = setup(cfg, ds_config, ds_path, info)
        loop(run, preemption)
    except RunDirRefused as err:  # in use or not shared: every rank learnt it from rank 0
        if info.is_main:
            print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2
    except ConfigError as err:  # found late (demo data, weights that do not fit): the message says it all
        print(f"[rank {info.rank}] config error: {err}", file=sys.stderr, flush=True)
        return 2
    except (DataLossError, SampleError, StreamError) as err:  # bad training data; the message names it
        if info.is_main or not isinstance(err, DataLossError):  # DataLossError: every rank, the same sums
            print(f"[rank {info.rank}] data error: {err}", file=sys.stderr, flush=True)
        return EXIT_DATA_LOSS
    except DivergedError as err:  # every rank stops the same way; one line is enough
        if info.is_main:
            print(err, file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except StorageFull as err:  # a checkpoint save: all ranks agreed on the failure, rank 0 says it
        if info.is_main:
            print(f"training stopped: {err}. {STORAGE_ADVICE}", file=sys.stderr, flush=True)
        return EXIT_STORAGE
    except Exception as err:
        if (full := as_storage_full(err)) is not None:  # a log or config write of this rank
            print(f"[rank {info.rank}] training stopped: {full}. {STORAGE_ADVICE}", file=sys.stderr)
            return EXIT_STORAGE
        if liveness is not None and (lost := liveness.explain(err)) is not None:  # a collective lost a rank
            print(f"[rank {info.rank}] {lost}; {resume_hint(cfg.run.dir)}", file=sys.stderr, flush=True)
            return EXIT_UNAVAILABLE
        if liveness is not None:  # so the ranks this failure stops do not report this one as lost
            liveness.leave(f"rank {info.rank} failed with {type(err).__name__}; see its traceback")
        print(f"[rank {info.rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return 1
    finally:
        if liveness is not None:
            liveness.stop()
        preemption.restore()
        if lock is not None:
            lock.release()
    return EXIT_PREEMPTED if preemption.stopped_at_step is not None else 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def setup(cfg: RunConfig, ds_config: dict, ds_path: str, info: DistInfo) -> Run:
    """Checks → run dir → data → frozen components and UNet → DeepSpeed engine → resume."""
    checked = check_run(cfg, world_size=info.world_size)  # before anything is written or built
    ds = resolve_ds_config(
        ds_config, cfg, world_size=info.world_size, source=ds_path, cuda=info.device.type == "cuda"
    )
    check_trainable_stage(ds, source=ds_path)
    run_dir = Path(cfg.run.dir)
    if info.is_main:
        for warning in checked.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in remove_stale_tmp(run_dir):  # this run holds the run dir lock: no save is in progress
            print(f"removed {run_dir / 'checkpoints' / name}: a save that never finished", file=sys.stderr)
        save_config(cfg, run_dir / "config.yaml")
        save_ds_config(ds, run_dir / "ds_config.json")
    seed_everything(cfg.run.seed)
    STARTUP.lap("checks")
    build_loader = build_latent_train_loader if cfg.data.source == "latents" else build_train_loader
    loader = build_loader(
        cfg.data.shards, batch_size=cfg.train.micro_batch_size, rank=info.rank, world_size=info.world_size,
        seed=cfg.run.seed, transform=_transform(cfg, cfg.data.background), workers=cfg.data.workers,
        shuffle_buffer=cfg.data.shuffle_buffer, bad_sample=cfg.data.bad_sample,
    )  # fmt: skip
    STARTUP.lap("data loader")
    components = in_training_precision(_frozen_components(cfg, run_dir, info), cfg).to(info.device)
    if needs_reshard(checked.resume, info.world_size):  # another world size: load the universal layout
        ds = with_universal_load(ds)
    STARTUP.lap("encoders")
    engine, counts = build_engine(cfg, ds, info)
    check_skips_nonfinite_gradients(engine, source=ds_path)
    ema = EMA(engine, cfg.train.ema_decay, cfg.train.ema_every)
    objective = DiffusionObjective(components, cfg, info.device)
    run = Run(cfg, info, run_dir, engine, ema, objective, components, loader, train_shards=pixel_shards(cfg))
    run.validate = checked.validate
    run.skipped.limit = cfg.train.max_bad_steps
    _resume(run, checked.resume)
    run.samples = SampleLog(run_dir, info.rank, cfg.logging.sample_ids)
    run.samples.start(run.start_step, is_main=info.is_main)  # collective when on
    if info.is_main:
        print(describe_trainable(counts), flush=True)
        print(f"world size {info.world_size}; starting at step {run.start_step}", flush=True)
    STARTUP.lap("ema + resume")
    return run


def build_engine(cfg: RunConfig, ds: dict, info: DistInfo):
    """The UNet inside a DeepSpeed engine with the run's optimizer and LR schedule (unless the JSON has its own).

    Returns (engine, parameter counts). Frozen parameters never reach the optimizer.
    """
    import deepspeed

    unet = compile_unet(build_unet(cfg), cfg, info.device)
    STARTUP.lap("unet")
    counts = select_trainable(unet, cfg.train.trainable)
    groups = param_groups(unet, cfg)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    optimizer = (
        None
        if "optimizer" in ds
        else build_optimizer(groups, cfg, offload and info.device.type == "cuda", device=info.device)
    )
    if offload and info.device.type != "cuda":
        ds["zero_force_ds_cpu_optimizer"] = False  # CPU-only: plain torch AdamW already runs on the CPU
    scheduler = (
        None if "scheduler" in ds else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    )
    engine, *_ = deepspeed.initialize(
        model=unet, model_parameters=groups, optimizer=optimizer, lr_scheduler=scheduler, config=ds
    )
    STARTUP.lap("deepspeed.initialize")
    return engine, counts


def _transform(cfg: RunConfig, background: str) -> TransformOptions:
    d = cfg.data
    return TransformOptions(
        resolution=d.resolution,
        num_views=len(d.views),
        background=background,
        clip_size=d.clip_size,
        views=tuple(d.views),  # the loader takes exactly these stored views, in this order
    )


def _frozen_components(cfg: RunConfig, run_dir: Path, info: DistInfo):
    """VAE, CLIP, scheduler from model.components, model.pretrained or tiny; runs without a pretrained folder
    keep a copy in run_dir/components, which export reuses."""
    components = build_components(cfg, saved=Path(cfg.model.components) if cfg.model.components else None)
    if cfg.data.source == "latents":  # before any precision cast: the identity hashes the weights as built
        check_latents_encoder(cfg, encoder_identity(components, cfg.data.resolution, cfg.data.clip_size))
    keep = cfg.model.components or not cfg.model.pretrained
    if info.is_main and keep and not (run_dir / "components").is_dir():
        save_components(components, run_dir / "components")
    return components


def _resume(run: Run, found: tuple[Path, str] | None) -> None:
    if found is None:
        return
    root, tag = found
    info = run.info
    state = load_checkpoint(
        run.engine, root, tag, rank=info.rank, world_size=info.world_size, ema=run.ema, run_dir=run.run_dir
    )
    run.loader.load_state_dict(state.data_state)
    run.start_step = state.step
    run.skipped.total = state.skipped_steps
    run.last_checkpoint = root / tag


def run_step(run: Run, batches, step: int) -> dict[str, float] | None:
    """One optimizer step (grad-accum micro-steps): encode → noise → forward → loss → backward → step → EMA.

    None when DeepSpeed skipped the update (a non-finite loss or gradient on any rank, ``engine.divergence``):
    the batches are used up, but the EMA and the step do not advance.
    """
    cfg, engine = run.cfg, run.engine
    micro = cfg.train.micro_batch_size
    # Losses and per-domain sums stay on the device (summed, read at the logging interval: engine.tracking)
    totals: dict[str, torch.Tensor | float] = {"data_wait_s": 0.0}
    any_bad = None  # device flag: some rank had a non-finite loss in some micro-step of this step
    for micro_step in range(cfg.train.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        totals["data_wait_s"] += time.perf_counter() - t0
        slots = _slots(batch, micro_step, run.info, micro)
        if run.samples is not None:
            run.samples.write(step + 1, micro_step, batch["object_id"], slots)
        generators = object_generators(cfg.run.seed, step, slots)
        inputs = run.objective.prepare(batch, generators)
        loss, parts = run.objective.loss(engine, inputs)
        bad = _nonfinite_on_any_rank(loss)  # collective: every rank poisons the same micro-steps
        any_bad = bad if any_bad is None else torch.maximum(any_bad, bad)
        engine.backward(_poisoned_where(loss, bad))
        engine.step()
        # per-domain sums and counts are divided after the global reduction (engine.objective.domain_means)
        for key, value in {"loss": loss.detach() / cfg.train.grad_accum, **parts}.items():
            totals[key] = totals.get(key, 0.0) + value
    # The one host read of a step (DeepSpeed's own step has read its overflow flag already)
    loss_finite = any_bad is None or not any_bad.item()
    if not engine.was_step_applied():  # DeepSpeed discarded the gradient; its LR scheduler did not step
        run.skipped.skipped(bad=not loss_finite or not engine.fp16_enabled())
        return None
    if not loss_finite:  # unreachable while check_skips_nonfinite_gradients holds; the weights are lost now
        last_good = last_good_checkpoint(run.last_checkpoint)
        raise DivergedError(
            f"training diverged: DeepSpeed applied the non-finite step {step + 1}; {last_good}"
        )
    run.skipped.applied()
    run.ema.update(step + 1)
    return totals


def _slots(batch: dict, micro_step: int, info: DistInfo, micro: int) -> list[int]:
    """Slot-in-step of each object of ``batch``: the objects' noise keys (``engine.randomness``). The loader
    lists each object's place in its window (a bad sample leaves a gap); a batch without it fills the window."""
    first = first_slot(micro_step, info.rank, info.world_size, micro)
    window = batch.get("window_slot", range(len(batch["object_id"])))
    return [first + int(i) for i in window]


def _nonfinite_on_any_rank(loss: torch.Tensor) -> torch.Tensor:
    """Collective, on the device (no host read): 1.0 when ``loss`` is non-finite on some rank, else 0.0."""
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad[0]


def _poisoned_where(loss: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``loss`` (times an exact 1.0), or where ``bad`` its NaN-poisoned form (``engine.divergence.poison``),
    chosen on the device so the micro-step need not wait for the flag."""
    return loss * torch.where(bad > 0, float("nan"), 1.0)


def loop(run: Run, preemption: Preemption | None = None) -> None:
    cfg, info = run.cfg, run.info
    tracker = Tracker(
        cfg, run.run_dir, is_main=info.is_main, start_step=run.start_step, total_steps=cfg.run.max_steps
    )
    meter = Throughput(cfg, info, dict(run.engine.module.config))
    data_loss = DataLoss(cfg.data.max_bad_fraction, run.run_dir, is_main=info.is_main)
    interval = IntervalMeans(info.device)  # logged: each interval's mean per step
    STARTUP.lap("trackers")
    batches = iter(run.loader)
    STARTUP.lap("loader start")
    step = run.start_step
    last_saved = step
    try:
        while step < cfg.run.max_steps:
            t0 = time.perf_counter()
            totals = run_step(run, batches, step)
            if totals is None:  # weights, EMA, LR and step unchanged; the batches are used up
                _skipped_step(run, step, tracker)
                if preemption is not None and preemption.stop_agreed(step, info.device):
                    break  # a run of skipped steps must not hold off a preemption
                continue
            step += 1
            tracker.advance()
            interval.add(totals, time.perf_counter() - t0)
            if (line := STARTUP.first_step(float(totals.get("data_wait_s", 0.0)))) is not None:
                tracker.write(line)  # once per process: where the time from the command to here went
            # collective: bad-data counts summed over ranks; every rank stops past data.max_bad_fraction
            data_metrics = data_loss.step(run.loader, info.device, step, tracker.log)
            if step % cfg.logging.every == 0 or step == cfg.run.max_steps:
                values, step_seconds = interval.reduce()  # collective: the interval's means over the ranks
                metrics = meter.metrics(domain_means(values), step_seconds, lr=run.engine.get_lr()[0])
                metrics["skipped_steps"] = float(run.skipped.total)
                metrics.update(data_metrics)
                tracker.log(step, metrics, show={**meter.postfix(metrics), **run.skipped.postfix()})
            if step % cfg.checkpoint.every == 0:
                _checkpoint(run, step, tracker)
                last_saved = step
            if preemption is not None and preemption.stop_agreed(step, info.device):
                break  # every rank, after the same step (skipping this step's validation)
            if cfg.validation.every and step % cfg.validation.every == 0:
                _validate(run, step, tracker)
        if last_saved != step:
            _checkpoint(run, step, tracker)
        if preemption is not None and preemption.stopped_at_step is not None:
            preemption.saved()
            tracker.write(f"step {step}: preempted; checkpoint saved, exiting with code {EXIT_PREEMPTED}")
            return
        if run.validate and (not cfg.validation.every or step % cfg.validation.every):
            _validate(run, step, tracker)
        tracker.log(step, {"replicas_in_sync": float(_check_replicas(run))})
        data_loss.report(run.loader, write=tracker.write)  # every skip, gathered; run.dir/data_report.json
    finally:
        # Shut the data workers down now, on every exit path: they block the preemption signals
        # (engine/preempt.py), so leaving them to the interpreter's exit-time terminate() would hang.
        batches.close()
        tracker.close()
        if run.samples is not None:
            run.samples.close()


def _check_replicas(run: Run) -> bool:
    """ZeRO-2 keeps a full weight replica per rank; they must be bit-identical. Raises if they are not."""
    digest = hashlib.sha256()
    for _, param in sorted(run.engine.module.named_parameters()):
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * run.info.world_size
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"weight replicas diverged across ranks: {digests}")
    return True


def _skipped_step(run: Run, step: int, tracker: Tracker) -> None:
    """Say that step ``step + 1`` was skipped; stop the run at train.max_bad_steps bad steps in a row."""
    skipped, t = run.skipped, run.cfg.train
    objects = t.micro_batch_size * t.grad_accum * run.info.world_size
    reason = (
        "non-finite loss or gradient" if skipped.last_bad else "fp16 gradient overflow (loss scale lowered)"
    )
    tracker.write(
        f"step {step + 1}: skipped ({reason}): weights, EMA and LR unchanged, its {objects} objects used up; "
        f"{skipped.in_a_row} bad in a row, {skipped.total} skipped in total"
    )
    if skipped.must_stop:
        tracker.log(step, {"skipped_steps": float(skipped.total), "lr": run.engine.get_lr()[0]})
        raise DivergedError(
            f"training diverged: {skipped.in_a_row} steps in a row with a non-finite loss or gradient after "
            f"step {step} (train.max_bad_steps={skipped.limit}); {last_good_checkpoint(run.last_checkpoint)}"
        )


def _checkpoint(run: Run, step: int, tracker: Tracker) -> None:
    extra = {
        "data_state": run.loader.state_dict(),
        "ema": run.ema,
        "config_yaml": yaml.safe_dump(config_to_dict(run.cfg), sort_keys=False),
        "skipped_steps": run.skipped.total,
    }
    try:
        path = save_checkpoint(run.engine, run.run_dir, step, rank=run.info.rank, extra=extra)
    except NonFiniteWeightsError as err:
        last_good = last_good_checkpoint(run.last_checkpoint)
        raise DivergedError(f"training diverged: {err}; {last_good}") from None
    run.last_checkpoint = path
    if run.info.is_main:
        removed = prune_checkpoints(run.run_dir, run.cfg.checkpoint.keep_last)
        tracker.write(
            f"step {step}: checkpoint {path}" + (f" (removed {', '.join(removed)})" if removed else "")
        )


def _validate(run: Run, step: int, tracker: Tracker) -> None:
    """Every rank generates its share of the validation objects (the same batch on every rank; ZeRO-2
    replicates the module weights, the EMA is gathered to all); rank 0 gathers, writes the grid and logs."""
    ema_weights = validation_weights(run.ema, run.cfg, run.engine.module)
    if run.val_batch is None:
        run.val_batch = _first_val_batch(run)
    out_png = run.run_dir / "validation" / f"step{step:08d}.png"
    info = run.info
    scores = run_validation(
        run.engine.module, run.components, ema_weights, run.val_batch, run.cfg, out_png,
        rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    if info.is_main:
        tracker.log(step, scores)
        tracker.log_image(step, "val/grid", out_png)
        tracker.write(
            f"step {step}: validation "
            + " ".join(f"{k}={v:.3f}" for k, v in scores.items())
            + f" -> {out_png}"
        )
    dist.barrier()


def _first_val_batch(run: Run) -> dict:
    cfg = run.cfg
    val_shards = cfg.data.val_shards or run.train_shards
    loader = build_val_loader(
        val_shards, batch_size=cfg.validation.num_objects, rank=0, world_size=1,
        transform=_transform(cfg, cfg.data.val_background), workers=0, seed=cfg.run.seed,
    )  # fmt: skip
    return next(iter(loader))
