"""The run configuration: one typed dataclass per concern, every knob with its default and meaning.

YAML files in ``configs/`` and dotted command-line overrides (``train.lr=1e-4``) fill these; see
``engine.config.loader``. The DeepSpeed JSON stays the source of truth for ZeRO settings; the fields here
that it also names (micro-batch, accumulation, clipping, precision) are checked against it.
"""

from dataclasses import dataclass, field
from typing import Literal

from engine.config.fields import opt

REFERENCE_VIEWS = ["front", "front_right", "right", "back", "left", "front_left"]


@dataclass
class RunSection:
    dir: str = opt(
        "runs/demo", "Run directory: checkpoints, metrics.jsonl, resolved configs, validation grids."
    )
    seed: int = opt(42, "Global seed: model init, data order, noise. Same seed -> same loss curve.", min=0)
    resume: str = opt(
        "auto", "'auto' (newest checkpoint in run.dir, if any), 'none', or a checkpoint/run directory path."
    )
    max_steps: int = opt(300, "Optimizer steps to train for (steps are counted, never epochs).", min=1)
    allow_batch_change: bool = opt(
        False,
        "Let a resume change the global batch (train.micro_batch_size x train.grad_accum x world size); "
        "refused otherwise. The world size, micro-batch and data.workers may change on resume as long as the "
        "global batch stays; the seed never (the data order depends on it).",
    )
    lock_stale_s: float = opt(
        300.0,
        "run.dir/run.lock keeps a second run out of this run dir. A lock from another host is taken over when "
        "its heartbeat (touched every few seconds) is older than this; one from this host as soon as its "
        "process is gone. Keep it well above the clock skew between nodes.",
        min=1.0,
    )
    rendezvous_timeout_s: float = opt(
        600.0,
        "How long every rank waits at start for all WORLD_SIZE ranks to reach rank 0's node "
        "(MASTER_ADDR:MASTER_PORT). A node that never comes up: every started rank exits (code 69) within this "
        "plus a few seconds, saying how many ranks joined. Nodes start at different times (ssh, container and "
        "venv start, imports and the shard checks on shared storage): keep it minutes.",
        min=1.0,
    )
    collective_timeout_s: float = opt(
        1800.0,
        "How long a collective (all-reduce, barrier) waits for the other ranks before it fails; the run then "
        "exits (code 69) naming the rank that went away. Validation waits for the rank with the most "
        "objects to generate; the CPU demo's first render runs on one process per node while the others wait "
        "at a barrier; a checkpoint save waits "
        "for the slowest rank's writes: keep it well above the longest validation and save you expect. A rank "
        "whose process dies is noticed at once (its sockets close); a node that vanishes without closing them "
        "(power, network cut, a frozen process) only after this time.",
        min=1.0,
    )
    threads_per_rank: int = opt(
        0,
        "CPU intra-op threads of each rank. 0: OMP_NUM_THREADS when you set it, else the cores this process "
        "may use ÷ the ranks on its node (torchrun sets OMP_NUM_THREADS=1 itself; the deepspeed launcher sets "
        "nothing). Data workers use one thread each. Idle OpenMP threads sleep at once "
        "(OMP_WAIT_POLICY=PASSIVE) unless you set OMP_WAIT_POLICY or GOMP_SPINCOUNT.",
        min=0,
    )


@dataclass
class ModelSection:
    pretrained: str = opt(
        "",
        "Diffusers folder (sd-image-variations layout: unet/ vae/ image_encoder/ scheduler/ "
        "feature_extractor/) or a Hugging Face hub id (lambdalabs/sd-image-variations-diffusers), read from "
        "the hub cache (HF_HOME; HF_HUB_OFFLINE=1 never downloads). Empty: build the tiny model below from "
        "config (CPU demo, tests).",
    )
    unet: str = opt(
        "",
        "Optional UNet to start from instead of pretrained/unet: a gnn3d run dir or export, a Wonder3D "
        "checkpoint folder, or a hub id. Loaded strictly: a missing or unexpected weight is an error.",
    )
    components: str = opt(
        "",
        "Folder of the frozen parts (vae/ image_encoder/ scheduler/ feature_extractor/, as a run's components/ "
        "or an export) used instead of model.pretrained's or the tiny ones. The CPU demo sets it to its "
        "fitted VAE.",
    )
    num_views: int = opt(6, "Views per object that attend to each other; must equal len(data.views).", min=1)
    multiview_attention: bool = opt(True, "Self-attention over all views of an object (Wonder3D default).")
    sparse_mv_attention: bool = opt(False, "Each view attends to the first view and itself only.")
    rowwise_mv_attention: bool = opt(
        False,
        "Era3D row-wise attention: each image row attends to the same row of all views (scores (views*width)^2 "
        "per row instead of (views*height*width)^2 per object; for large latents). Same weights as dense.",
    )
    cd_attention_mid: bool = opt(True, "Cross-domain attention after self-attention (needs data.mode=joint).")
    cd_attention_last: bool = opt(
        False, "Cross-domain attention after the feed-forward (needs data.mode=joint)."
    )
    attention: Literal["auto", "xformers", "sdpa", "math"] = opt(
        "auto", "Attention kernel: auto = xformers on CUDA when installed, else PyTorch SDPA."
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    zero_init_conv_in: bool = opt(
        True, "When widening a 2D UNet's conv_in 4->8, zero the new input channels."
    )
    demo_vae_steps: int = opt(
        1000,
        "Tiny model on demo data only: steps fitting the tiny VAE to the demo renders before training "
        "(once, cached next to the demo shards); 0 keeps the random VAE.",
        min=0,
    )
    demo_vae_lr: float = opt(5e-3, "Tiny model on demo data only: learning rate of the demo VAE fit.", min=0)
    demo_vae_batch_size: int = opt(8, "Tiny model on demo data only: images per demo VAE fit step.", min=1)
    block_out_channels: list[int] = opt([32, 64], "Tiny model only: UNet widths per resolution level.")
    layers_per_block: int = opt(1, "Tiny model only: ResNet layers per UNet block.", min=1)
    attention_head_dim: int = opt(8, "Tiny model only: channels per attention head.", min=1)
    cross_attention_dim: int = opt(
        32, "Tiny model only: CLIP embedding width (cross-attention context).", min=1
    )


@dataclass
class DataSection:
    shards: str = opt(
        "",
        "Training shards: brace pattern (/data/shard-{000000..000099}.tar), a list file, a manifest.json, or "
        "pipe: URLs. Empty: the synthetic demo shards, generated on first use into data.demo_cache.",
    )
    source: Literal["pixels", "latents"] = opt(
        "pixels",
        "pixels: data.shards are image shards, the frozen VAE/CLIP encode every step. latents: data.shards is a "
        "folder of cached latents written by launcher/encode.py (or its latents.json): nothing is encoded in "
        "the step; the run's VAE/CLIP, data.resolution, clip_size, views and backgrounds must be the encoded "
        "ones. Validation still reads pixels (data.val_shards, else the encoded shards' validation split).",
    )
    val_shards: str = opt("", "Validation shards (same forms). Empty with a manifest: its validation split.")
    demo_cache: str = opt("~/.cache/gnn3d/demo", "Where the synthetic demo dataset is rendered and sharded.")
    demo_objects: int = opt(48, "Objects in the synthetic demo dataset.", min=2)
    resolution: int = opt(256, "Training image size (square); must be a multiple of 8 (VAE factor).", min=16)
    views: list[str] = opt(
        list(REFERENCE_VIEWS),
        "Target views, in order: any subset or reorder of the views the shards store (the loader takes exactly "
        "these: images, normals, cameras, embeddings); the first must be 'front', the condition view.",
    )
    mode: Literal["joint", "mix"] = opt(
        "joint",
        "joint: color and normal views of each object together (2*V*B images, stage 2); "
        "mix: each object gives color or normal views 50/50 (stage 1).",
    )
    background: Literal["white", "black", "gray", "random"] = opt(
        "random", "Training background behind the alpha mask; random = one of the three per object."
    )
    val_background: Literal["white", "black", "gray", "random"] = opt("white", "Validation background.")
    clip_size: int = opt(224, "CLIP input size.", min=16)
    workers: int = opt(2, "DataLoader worker processes per rank (decoding and augmentation).", min=0)
    shuffle_buffer: int = opt(
        64,
        "Samples per shuffle block of the global sample order (consecutive shards holding at least this many "
        "are shuffled together; 0 = no sample shuffle). A resume must keep it.",
        min=0,
    )
    bad_sample: Literal["skip", "raise"] = opt(
        "skip",
        "On a corrupt sample or unreadable shard: skip (count, log as data/bad_samples and data/bad_shards, "
        "list in run.dir/data_report.json) or raise (stop naming shard and object, exit 65).",
    )
    max_bad_fraction: float = opt(
        0.05,
        "Stop (exit 65) once more than this share of the samples read, summed over ranks, were bad -- judged "
        "from 1/fraction samples on, so one early bad sample never stops a run. Converted shards are verified, "
        "so losses come from storage (a lost shard of many is tolerated); 1 = never stop.",
        min=0.0,
        max=1.0,
    )


@dataclass
class TrainSection:
    micro_batch_size: int = opt(
        2, "Objects per rank per forward (each object = 2*V images in joint mode).", min=1
    )
    grad_accum: int = opt(1, "Gradient accumulation steps.", min=1)
    global_batch_size: int = opt(
        0,
        "Objects per optimizer step over all ranks. 0 = off (train.grad_accum decides). When set, it "
        "overrides train.grad_accum with global_batch_size / (micro_batch_size x world size), so a run "
        "resumed on another number of GPUs keeps its batch without other changes.",
        min=0,
    )
    lr: float = opt(1e-4, "Peak learning rate (AdamW).", min=0.0)
    lr_schedule: Literal["constant", "cosine"] = opt("constant", "After warmup: constant or cosine to 0.")
    warmup_steps: int = opt(100, "Linear warmup steps.", min=0)
    weight_decay: float = opt(1e-2, "AdamW weight decay.", min=0.0)
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.", min=0.0)
    grad_clip: float = opt(
        1.0, "Max gradient norm (0 disables); fills DeepSpeed's gradient_clipping.", min=0.0
    )
    max_bad_steps: int = opt(
        5,
        "A step with a non-finite loss or gradient is skipped (no optimizer, EMA, LR or step advance; its "
        "batch is used up) and counted; this many in a row stop the run (exit 3) naming the last good "
        "checkpoint. 0 = never stop (fp16 loss-scale skips with a finite loss do not count).",
        min=0,
    )
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "Fills DeepSpeed's bf16/fp16 'auto' fields. fp16 needs CUDA."
    )
    prediction_type: Literal["epsilon", "v_prediction"] = opt("epsilon", "What the UNet predicts.")
    snr_gamma: float = opt(5.0, "Min-SNR loss weighting gamma (0 = plain MSE).", min=0.0)
    drop_image_embed: float = opt(
        0.05, "Per-object probability to zero only the CLIP embedding (CFG).", min=0, max=1
    )
    drop_cond_latent: float = opt(
        0.05, "Per-object probability to zero only the condition latent.", min=0, max=1
    )
    drop_both: float = opt(0.05, "Per-object probability to zero both conditions.", min=0, max=1)
    ema_decay: float = opt(0.9999, "EMA decay of the UNet weights (0 disables EMA).", min=0.0, max=1.0)
    ema_every: int = opt(1, "Update the EMA every k optimizer steps.", min=1)
    compile: bool = opt(
        False,
        "Run the UNet under torch.compile (inductor), for CUDA runs: refused on the CPU, where inductor "
        "computed wrong UNet gradients (torch 2.13). Compiled in place, so checkpoints, EMA and export keep "
        "the same weight names. The first steps (and the first validation) pay the compile time.",
    )
    trainable: list[str] = opt(["*"], "Name patterns (fnmatch) of UNet parameters to train; the rest frozen.")
    lr_multipliers: list[str] = opt(
        ["class_embedding.*=10"],
        "Per-pattern learning-rate factors 'pattern=factor' (fnmatch on UNet parameter names; the first "
        "match wins, unmatched parameters use 1). Default: the camera class embedding at 10x, as Wonder3D.",
    )


@dataclass
class CheckpointSection:
    every: int = opt(100, "Save a checkpoint every N optimizer steps (and always at the end).", min=1)
    keep_last: int = opt(
        3, "Checkpoints to keep; older ones are deleted after a newer one is complete.", min=1
    )
    preempt_grace_s: float = opt(
        25.0,
        "On SIGTERM/SIGUSR1 (preemption) all ranks finish the step, save a checkpoint and exit 75; a save "
        "not done this many seconds after the signal ends the run with a message (exit 1; the previous "
        "checkpoint stays latest). Keep it under the cluster's grace (30 s by default in Kubernetes, SLURM "
        "and the deepspeed/torchrun launchers). 0 = no limit of our own.",
        min=0.0,
    )


@dataclass
class LoggingSection:
    every: int = opt(10, "Log metrics every N optimizer steps.", min=1)
    wandb_mode: Literal["offline", "online", "disabled"] = opt(
        "offline", "wandb mode; env WANDB_MODE overrides. offline needs no network (sync later)."
    )
    wandb_project: str = opt("gnn3d", "wandb project; env WANDB_PROJECT overrides.")
    wandb_entity: str = opt("", "wandb entity (user or team); env WANDB_ENTITY overrides. Set it only here.")
    run_name: str = opt("", "Run name shown in wandb/tensorboard; empty = basename of run.dir.")
    tensorboard: bool = opt(True, "Also write tensorboard event files under run.dir/tb.")
    sample_ids: bool = opt(
        False,
        "Write the object ids of every micro-step to run.dir/samples/rank{r}.jsonl (one line {step, "
        "micro_step, rank, ids, slots}; slots = each object's place in the step's global batch): an audit of "
        "the data order, e.g. after a resume on another number of GPUs.",
    )
    peak_tflops: float = opt(
        0.0,
        "Peak dense TFLOP/s of one device, for MFU. 0 = known GPUs auto-detected; MFU not shown on CPU.",
        min=0,
    )


@dataclass
class ValidationSection:
    every: int = opt(100, "Validate every N optimizer steps (and at the end); 0 = only at the end.", min=0)
    num_objects: int = opt(4, "Held-out objects per validation.", min=1)
    steps: int = opt(10, "Sampler steps for validation generation.", min=1)
    guidance: float = opt(1.0, "Classifier-free guidance scale for validation.", min=0.0)
    scheduler: Literal["ddim", "dpm"] = opt("ddim", "Sampler for validation generation.")
    use_ema: bool = opt(True, "Generate with the EMA weights (when EMA is enabled).")


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    # Where each dotted key was last set ("configs/x.yaml", "command line"), for error messages.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def source_of(self, key: str) -> str:
        """The file (or 'command line', or 'default') that set ``key``."""
        return self.sources.get(key, "default")
