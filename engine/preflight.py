"""Everything a run needs, checked before any expensive work (demo render, VAE fit, model build, DeepSpeed).

Each problem is a ConfigError naming the key and the file: ``launcher/train.py`` prints it as one line and
exits 2, before ``torch.distributed`` starts (and ``--check`` runs exactly these checks). ``engine.train.setup``
runs them again on the final config (the demo's shards exist by then) before it writes anything.
Only small files are read: model folders' config.json / run_config.yaml, the shard manifest, the checkpoint's
run_config.yaml and its file listing.
"""

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from datapipes.latent_format import LatentsError, latents_manifest_path, load_latents_manifest
from datapipes.latent_stream import latent_shards
from datapipes.manifest import ManifestError
from datapipes.shard_io import ShardInfo, resolve_shards, shard_name
from datapipes.stream_state import StreamStateError, check_resumable, merge_stream_states, shards_fingerprint
from datapipes.transform import BACKGROUNDS
from engine.checkpoint import check_same_architecture, find_resume_dir
from engine.config import ConfigError, RunConfig, load_config
from engine.config.checks import derive_grad_accum
from engine.rank_state import saved_data_states, saved_rank_count
from engine.rundir import in_use_error, live_holder
from engine.safe_load import check_checkpoint_dir
from modeling.hub import is_hub_id

# Subfolders that modeling.components.load_components reads.
COMPONENT_DIRS = ("vae", "image_encoder", "scheduler", "feature_extractor")
MV_UNET_IN_CHANNELS = 8  # noisy latent (4) + condition latent (4)


@dataclass
class Preflight:
    """What the checks found that the run needs later."""

    resume: tuple[Path, str] | None = None  # (checkpoints root, tag) to resume from
    val_objects: int | None = None  # objects in the validation split; None = not counted (no manifest)
    warnings: list[str] = field(default_factory=list)

    @property
    def validate(self) -> bool:
        """False only for a validation split known to be empty (allowed with validation.every=0)."""
        return self.val_objects != 0


def check_run(cfg: RunConfig, *, world_size: int) -> Preflight:
    """Run every check; raise ConfigError on the first problem. Data checks wait for ``data.shards`` (the
    demo sets it after rendering and calls ``check_data`` itself)."""
    derive_grad_accum(cfg, world_size=world_size)  # train.global_batch_size decides it for this world size
    check_model_folders(cfg)
    check_run_dir(cfg)
    result = Preflight()
    result.resume, result.warnings = check_resume(cfg, world_size=world_size)
    if cfg.data.shards:
        result.val_objects, warnings = check_data(cfg, world_size=world_size)
        result.warnings += warnings
    return result


def _fail(cfg: RunConfig, key: str, message: str) -> ConfigError:
    return ConfigError(message, key=key, source=cfg.source_of(key))


# ------------------------------------------------------------------------------------------ model folders


def check_model_folders(cfg: RunConfig) -> None:
    """model.pretrained / model.unet / model.components exist and fit the run config (their JSON only)."""
    m = cfg.model
    if m.pretrained and (folder := _model_folder(cfg, "model.pretrained")) is not None:
        needed = [] if m.components else list(COMPONENT_DIRS)  # model.components replaces these
        _require_subfolders(cfg, "model.pretrained", folder, needed + ([] if m.unet else ["unet"]))
        if not m.unet:
            config, path = _read_json(cfg, "model.pretrained", folder / "unet" / "config.json")
            if config.get("in_channels") not in (4, MV_UNET_IN_CHANNELS):
                raise _fail(
                    cfg, "model.pretrained", f"{path}: in_channels={config.get('in_channels')}, want 4"
                )
    if m.components and (folder := _model_folder(cfg, "model.components")) is not None:
        _require_subfolders(cfg, "model.components", folder, COMPONENT_DIRS)
    if m.unet:
        _check_unet_source(cfg)


def hub_model_folder(name: str, key: str) -> Path | None:
    """Hook for hub ids ("org/name"): the folder modeling.hub resolves (cache first, download when online);
    its own ConfigError names the key when the id resolves to nothing."""
    from engine.sources import resolve_pretrained

    return resolve_pretrained(name, key=key)


def _model_folder(cfg: RunConfig, key: str) -> Path | None:
    value = getattr(cfg.model, key.split(".")[1])
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if is_hub_id(value):
        try:
            return hub_model_folder(value, key)
        except ConfigError as error:  # add where the key was set
            raise _fail(cfg, key, str(error).removeprefix(f"{key}: ")) from None
    what = "is not a folder" if path.exists() else "does not exist"
    raise _fail(cfg, key, f"{value} {what}")


def _require_subfolders(cfg: RunConfig, key: str, folder: Path, names) -> None:
    missing = [name for name in names if not (folder / name).is_dir()]
    if missing:
        raise _fail(cfg, key, f"{folder} has no {', '.join(n + '/' for n in missing)} (diffusers layout)")


def _read_json(cfg: RunConfig, key: str, path: Path) -> tuple[dict, Path]:
    try:
        return json.loads(path.read_text()), path
    except FileNotFoundError:
        raise _fail(cfg, key, f"{path} does not exist") from None
    except (OSError, ValueError) as error:
        raise _fail(cfg, key, f"cannot read {path}: {error}") from None


def _check_unet_source(cfg: RunConfig) -> None:
    """model.unet: a run dir (its checkpoint's run_config.yaml), a gnn3d export / unet/ folder, or a Wonder3D
    UNet folder (config.json): views, input channels and cross-domain layers must fit the run config."""
    folder = _model_folder(cfg, "model.unet")
    if folder is None:
        return
    pointer = folder / "checkpoints" / "latest"
    if pointer.is_file():
        saved_path = folder / "checkpoints" / pointer.read_text().strip() / "run_config.yaml"
        saved = load_config(saved_path)
        check_checkpoint_dir(saved_path.parent)  # a file that could run code when unpickled: refused now
        config = {
            "num_views": saved.model.num_views,
            "cd_attention_mid": saved.model.cd_attention_mid,
            "cd_attention_last": saved.model.cd_attention_last,
        }
        _check_unet_config(cfg, config, saved_path)
        return
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise _fail(
            cfg,
            "model.unet",
            f"{folder} has neither config.json nor unet/config.json nor checkpoints/latest "
            "(want a gnn3d export, its unet/, a Wonder3D UNet folder or a run dir)",
        )
    config, path = _read_json(cfg, "model.unet", unet_dir / "config.json")
    _check_unet_config(cfg, config, path)


def _check_unet_config(cfg: RunConfig, config: dict, path: Path) -> None:
    views = config.get("num_views")
    if views is not None and views != cfg.model.num_views:
        raise _fail(
            cfg,
            "model.num_views",
            f"{cfg.model.num_views}, but the model.unet UNet {path} has num_views={views}; set "
            f"model.num_views={views} (and data.views to match) or use another UNet",
        )
    channels = config.get("in_channels", MV_UNET_IN_CHANNELS)
    if channels != MV_UNET_IN_CHANNELS:
        raise _fail(
            cfg,
            "model.unet",
            f"{path} has in_channels={channels}, a multi-view UNet has {MV_UNET_IN_CHANNELS} (noisy + "
            "condition latent); start a 2D UNet through model.pretrained instead",
        )
    for flag in ("cd_attention_mid", "cd_attention_last"):  # adding cross-domain layers is fine, not dropping
        if config.get(flag) and not getattr(cfg.model, flag):
            raise _fail(
                cfg,
                f"model.{flag}",
                f"false, but the model.unet UNet {path} has {flag}=true (its trained layers would be "
                f"dropped); set model.{flag}=true",
            )


# --------------------------------------------------------------------------------------------- run dir


def check_run_dir(cfg: RunConfig) -> None:
    """run.dir is (or can be created as) a writable folder, and no live run holds its lock (read only: the
    lock itself is taken by ``engine.train.train``, never by ``--check``)."""
    run_dir = Path(cfg.run.dir).expanduser()
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise _fail(cfg, "run.dir", f"{existing} is not a folder, so {run_dir} cannot be created there")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise _fail(cfg, "run.dir", f"{existing} is not writable ({error.strerror})") from None
    if (holder := live_holder(run_dir, cfg.run.lock_stale_s)) is not None:
        raise in_use_error(cfg, holder)


# --------------------------------------------------------------------------------------------- resume


def check_resume(cfg: RunConfig, *, world_size: int) -> tuple[tuple[Path, str] | None, list[str]]:
    """(the checkpoint ``run.resume`` names or None, warnings); refuses one this run cannot continue.

    Another world size, micro-batch or data.workers is fine (the ZeRO state is re-sharded, the data position
    is a place in one global order). Refused (one line, before the checkpoint is loaded): another
    architecture or seed, a data position saved by gnn3d v0.1, and another global batch (micro-batch x
    grad-accum x world size) unless ``run.allow_batch_change``.
    """
    found = find_resume_dir(cfg.run.resume, Path(cfg.run.dir))
    if found is None:
        return None, []
    saved_path = found[0] / found[1] / "run_config.yaml"
    if not saved_path.is_file():
        raise _fail(cfg, "run.resume", f"{saved_path} is missing: not a complete gnn3d checkpoint")
    saved = load_config(saved_path)
    check_same_architecture(saved, cfg, source=str(saved_path))
    check_checkpoint_dir(saved_path.parent)  # a file that could run code when unpickled: refused now
    if saved.run.seed != cfg.run.seed:
        raise _fail(
            cfg,
            "run.seed",
            f"{cfg.run.seed}, but the checkpoint {saved_path} ran with {saved.run.seed}; the data order and the "
            "noise depend on it. Set it back, or start a new run.dir (model.unet=<this run dir> starts from its "
            "weights)",
        )
    saved_world = saved_rank_count(saved_path.parent)
    before = saved.train.micro_batch_size * saved.train.grad_accum * saved_world
    now = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    warnings = []
    if before != now:
        keep = before / (cfg.train.micro_batch_size * world_size)
        keep_text = (
            f"train.grad_accum={int(keep)}" if keep.is_integer() and keep >= 1 else "no train.grad_accum"
        )
        t = saved.train
        change = (
            f"the global batch changes from {before} to {now} objects (the checkpoint {saved_path} ran "
            f"{saved_world} rank(s) x micro-batch {t.micro_batch_size} x train.grad_accum={t.grad_accum}); "
            f"{keep_text} keeps it"
        )
        if not cfg.run.allow_batch_change:
            raise _fail(
                cfg,
                "train.grad_accum",
                f"{cfg.train.grad_accum}, but {change}. Or set run.allow_batch_change=true",
            )
        warnings.append(f"run.allow_batch_change: {change}")
    _check_stream_state(cfg, saved_path.parent, world_size=world_size)
    return found, warnings


def _check_stream_state(cfg: RunConfig, tag_dir: Path, *, world_size: int) -> None:
    """The saved data position continues on this world size and micro-batch (a v0.1 one never does)."""
    try:
        merged = merge_stream_states(saved_data_states(tag_dir), 0)
        check_resumable(merged, world_size=world_size, batch_size=cfg.train.micro_batch_size)
    except StreamStateError as error:
        raise _fail(cfg, "run.resume", f"{tag_dir}: {error}") from None
    # The order depends on these too; the loader would refuse them only after the model and engine are built.
    if merged["shuffle_buffer"] != cfg.data.shuffle_buffer:
        raise _fail(
            cfg,
            "data.shuffle_buffer",
            f"{cfg.data.shuffle_buffer}, but the checkpoint {tag_dir} read the data in shuffle blocks of "
            f"{merged['shuffle_buffer']}: its data position means nothing in another order. Set it back",
        )
    if _train_shards_fingerprint(cfg) not in (None, merged["shards"]):
        raise _fail(
            cfg,
            "data.shards",
            f"{cfg.data.shards} lists other shards (file names or sample counts) than the checkpoint {tag_dir} "
            "was reading: its data position means nothing in them. Point data.shards back at those shards, or "
            "start a new run.dir (model.unet=<this run dir> starts from its weights)",
        )


def _train_shards_fingerprint(cfg: RunConfig) -> str | None:
    """The stream's fingerprint of the training shards, or None when unknown here (no manifest counts, or
    a problem that ``check_data`` reports in its own words)."""
    latents = cfg.data.source == "latents"
    try:
        if not cfg.data.shards:
            shards = []
        else:
            shards = latent_shards(cfg.data.shards) if latents else resolve_shards(cfg.data.shards, "train")
    except (ManifestError, LatentsError, OSError):
        return None
    counts = [shard.samples for shard in shards]
    if not shards or None in counts:
        return None
    return shards_fingerprint([shard_name(shard.url) for shard in shards], counts)


# ------------------------------------------------------------------------------------------------- data


def check_data(cfg: RunConfig, *, world_size: int) -> tuple[int | None, list[str]]:
    """Shards exist; the validation split fits ``validation.*``. Any number of shards feeds any number of
    ranks and workers (they read slots of one global order, not whole shards).

    Returns (objects in the validation split or None when not counted, warnings).
    """
    if cfg.data.source == "latents":
        check_latents(cfg)
    else:
        _local_shards(cfg, "data.shards", cfg.data.shards, "train")
    val_key = "data.val_shards" if cfg.data.val_shards else "data.shards"
    val = _local_shards(cfg, val_key, cfg.data.val_shards or pixel_shards(cfg), "val")
    counts = [s.samples for s in val]
    if None in counts:
        return None, []
    objects, where = sum(counts), _spec_file(cfg.data.val_shards or pixel_shards(cfg))
    if objects == 0:
        if cfg.validation.every:
            raise ConfigError(
                "the validation split holds no objects; set data.val_shards to held-out shards, convert with a "
                "larger --val-fraction, or set validation.every=0 to train without validation",
                key=val_key,
                source=where,
            )
        return 0, [f"{where}: the validation split holds no objects: validation is off for this run"]
    if cfg.validation.num_objects > objects:
        raise ConfigError(
            f"{cfg.validation.num_objects} (set by {cfg.source_of('validation.num_objects')}), but the validation "
            f"split holds {objects} object(s); set validation.num_objects <= {objects}",
            key="validation.num_objects",
            source=where,
        )
    return objects, []


def _spec_file(spec: str) -> str:
    path = Path(spec)
    return str(path / "manifest.json") if path.is_dir() else spec


def _local_shards(cfg: RunConfig, key: str, spec: str, split: str) -> list[ShardInfo]:
    """The shards of ``spec``; every local one must exist (URLs like pipe: or s3:// are taken as given)."""
    try:
        shards = resolve_shards(spec, split)
    except (ManifestError, OSError) as error:
        raise _fail(cfg, key, str(error)) from None
    for shard in shards:
        if not _is_url(shard.url) and not Path(shard.url).is_file():
            raise _fail(cfg, key, f"shard {shard.url} (listed by {_spec_file(spec)}) does not exist")
    return shards


def _is_url(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


# ---------------------------------------------------------------------------------------- cached latents


def pixel_shards(cfg: RunConfig) -> str:
    """The run's image shards: data.shards, or for data.source=latents the shards they were encoded from
    (latents.json's source_manifest), whose validation split validation reads."""
    if cfg.data.source != "latents":
        return cfg.data.shards
    try:
        return load_latents_manifest(cfg.data.shards)["source_manifest"]
    except LatentsError as error:
        raise _fail(cfg, "data.shards", str(error)) from None


def check_latents(cfg: RunConfig) -> None:
    """data.shards is a complete latents folder made for this run: resolution, clip size, the views of
    data.views, every background data.background can draw, and its shard files are there."""
    file, d = latents_manifest_path(cfg.data.shards), cfg.data
    try:
        manifest = load_latents_manifest(file)
    except LatentsError as error:
        raise _fail(cfg, "data.shards", str(error)) from None
    if not manifest["complete"]:
        raise _fail(
            cfg,
            "data.shards",
            f"{file} is incomplete ({len(manifest['shards'])} shards encoded so far): rerun the same "
            "launcher/encode.py command to finish it",
        )
    for key, option in (("resolution", "--resolution"), ("clip_size", "--clip-size")):
        if getattr(d, key) != manifest[key]:
            raise _fail(
                cfg,
                f"data.{key}",
                f"{getattr(d, key)}, but the latents {file} were encoded with {key} {manifest[key]}; set "
                f"data.{key}={manifest[key]} or encode again with {option} {getattr(d, key)}",
            )
    missing = [view for view in d.views if view not in manifest["views"]]
    if missing or manifest["cond_view"] != d.views[0]:
        stored = f"holds views {manifest['views']}, condition view {manifest['cond_view']!r}"
        raise _fail(cfg, "data.views", f"{d.views} are not all encoded: {file} {stored}")
    drawable = list(BACKGROUNDS) if d.background == "random" else [d.background]
    absent = [name for name in drawable if name not in manifest["backgrounds"]]
    if absent:
        raise _fail(
            cfg,
            "data.background",
            f"{d.background} draws {absent}, but {file} holds only backgrounds {manifest['backgrounds']}; "
            f"encode with --backgrounds {','.join(drawable)} or set data.background to one it holds",
        )
    for shard in latent_shards(file):
        if not Path(shard.url).is_file():
            raise _fail(cfg, "data.shards", f"shard {shard.url} (listed by {file}) does not exist")


def check_latents_encoder(cfg: RunConfig, identity: str) -> None:
    """The run's VAE + CLIP (``engine.encoding.encoder_identity`` of the built components, before any
    precision cast) must be the encoder the latents were made with."""
    file = latents_manifest_path(cfg.data.shards)
    stored = load_latents_manifest(file)["encoder"]
    if stored["hash"] != identity:
        raise _fail(
            cfg,
            "data.shards",
            f"the latents {file} were encoded by VAE/CLIP {stored['hash']} ({stored['vae']}), this run's "
            f"VAE/CLIP is {identity}: train with the encoder they were made with (model.pretrained / "
            "model.components) or encode again with this one",
        )
