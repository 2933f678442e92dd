"""Checks that involve more than one key: each names the keys to change and where they were set."""

from pathlib import Path

from datapipes.latent_format import is_latents_dir
from datapipes.manifest import ManifestError
from datapipes.sample import SampleError
from datapipes.shard_io import stored_views
from engine.config.errors import ConfigError
from engine.config.schema import REFERENCE_VIEWS, RunConfig


def check_consistency(cfg: RunConfig) -> None:
    """Raise ConfigError on the first inconsistent combination of settings."""
    _source(cfg)  # first: the other checks read data.shards as data.source says
    for check in (_views, _domains, _resolution, _dropout, _betas, _validation, _held_out, _lr_multipliers):
        check(cfg)


def _fail(cfg: RunConfig, key: str, message: str) -> ConfigError:
    return ConfigError(message, key=key, source=cfg.source_of(key))


def _source(cfg: RunConfig) -> None:
    """data.shards must be what data.source says: a latents folder (launcher/encode.py) or image shards."""
    shards, latents = cfg.data.shards, cfg.data.source == "latents"
    if latents and not shards:
        raise _fail(
            cfg,
            "data.source",
            "latents, but data.shards is empty (the demo renders images): set data.shards to a latents folder "
            "(python launcher/encode.py --shards <converted shards> --out <folder>)",
        )
    if latents and not is_latents_dir(shards):
        raise _fail(
            cfg,
            "data.shards",
            f"{shards} is not a latents folder (no readable latents.json; data.source=latents, set by "
            f"{cfg.source_of('data.source')}): give launcher/encode.py's --out folder, or data.source=pixels",
        )
    if not latents and shards and is_latents_dir(shards):
        raise _fail(
            cfg,
            "data.shards",
            f"{shards} is a latents folder (latents.json) but data.source=pixels: set data.source=latents",
        )


def _views(cfg: RunConfig) -> None:
    views = cfg.data.views
    unknown = [v for v in views if v not in REFERENCE_VIEWS]
    if unknown:
        raise _fail(cfg, "data.views", f"unknown view(s) {unknown}; the camera rig has {REFERENCE_VIEWS}")
    if len(set(views)) != len(views):
        raise _fail(cfg, "data.views", f"views repeat: {views}")
    if views[0] != "front":
        raise _fail(cfg, "data.views", "the first view must be 'front' (the condition view)")
    if cfg.model.num_views != len(views):
        raise _fail(
            cfg,
            "model.num_views",
            f"model.num_views={cfg.model.num_views} but data.views lists {len(views)} views "
            f"(set by {cfg.source_of('data.views')}); make them agree",
        )
    for key, spec, split in (
        ("data.shards", cfg.data.shards if cfg.data.source == "pixels" else "", "train"),  # else preflight
        ("data.val_shards", cfg.data.val_shards, "val"),
    ):
        _views_stored(cfg, key, spec, split)


def _views_stored(cfg: RunConfig, shards_key: str, spec: str, split: str) -> None:
    """data.views must be views the shards store, and the shards must condition on 'front' like data.views."""
    try:
        found = stored_views(spec, split) if spec else None
    except (ManifestError, SampleError, OSError):
        return  # an unreadable manifest or shard is reported by the checks of the data paths
    if found is None:  # remote shards: each sample is checked as it is decoded
        return
    stored, cond_view, where = found
    missing = [v for v in cfg.data.views if v not in stored]
    if missing:
        raise _fail(
            cfg,
            "data.views",
            f"{missing} not stored in the {shards_key} shards ({where} holds {list(stored)})",
        )
    if cond_view != cfg.data.views[0]:
        raise _fail(
            cfg, "data.views", f"the {shards_key} shards condition on {cond_view!r} ({where}), not 'front'"
        )


def _domains(cfg: RunConfig) -> None:
    cross_domain = cfg.model.cd_attention_mid or cfg.model.cd_attention_last
    if cfg.data.mode == "mix" and cross_domain:
        raise _fail(
            cfg,
            "data.mode",
            "mix mode gives each object one domain, so cross-domain attention has no partner: "
            "set model.cd_attention_mid=false and model.cd_attention_last=false, or data.mode=joint",
        )
    if cfg.model.sparse_mv_attention and not cfg.model.multiview_attention:
        raise _fail(cfg, "model.sparse_mv_attention", "needs model.multiview_attention=true")
    if cfg.model.rowwise_mv_attention and cfg.model.sparse_mv_attention:
        raise _fail(
            cfg,
            "model.rowwise_mv_attention",
            "cannot be combined with model.sparse_mv_attention (two different view patterns); set one to false",
        )
    if cfg.model.rowwise_mv_attention and not cfg.model.multiview_attention:
        raise _fail(cfg, "model.rowwise_mv_attention", "needs model.multiview_attention=true")


def _resolution(cfg: RunConfig) -> None:
    if cfg.data.resolution % 8:
        raise _fail(cfg, "data.resolution", f"{cfg.data.resolution} is not a multiple of 8 (the VAE factor)")


def _dropout(cfg: RunConfig) -> None:
    t = cfg.train
    total = t.drop_image_embed + t.drop_cond_latent + t.drop_both
    if total > 1.0:
        raise _fail(cfg, "train.drop_both", f"drop_image_embed + drop_cond_latent + drop_both = {total} > 1")


def _betas(cfg: RunConfig) -> None:
    betas = cfg.train.adam_betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise _fail(cfg, "train.adam_betas", f"need two values in [0, 1), got {betas}")


def _validation(cfg: RunConfig) -> None:
    if not cfg.train.trainable:
        raise _fail(cfg, "train.trainable", "no trainable parameter patterns; use ['*'] to train everything")


def _held_out(cfg: RunConfig) -> None:
    """Validation must use held-out objects: a manifest has a val split; any other shard spec needs val_shards."""
    shards = cfg.data.shards
    if not shards or cfg.data.val_shards or cfg.data.source == "latents":  # latents: their source's val split
        return
    is_manifest = shards.endswith("manifest.json") or (Path(shards) / "manifest.json").is_file()
    if not is_manifest:
        raise _fail(
            cfg,
            "data.val_shards",
            f"data.shards={shards!r} is not a manifest, so it has no validation split; set data.val_shards "
            "to held-out shards (or point data.shards at the converter's manifest.json)",
        )


def parse_lr_multiplier(entry: str) -> tuple[str, float]:
    """'pattern=factor' -> (pattern, factor); ValueError when malformed or negative."""
    pattern, sep, factor = entry.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"{entry!r} is not 'pattern=factor'")
    value = float(factor)
    if value < 0:
        raise ValueError(f"{entry!r}: the factor must be >= 0")
    return pattern, value


def _lr_multipliers(cfg: RunConfig) -> None:
    for entry in cfg.train.lr_multipliers:
        try:
            parse_lr_multiplier(entry)
        except ValueError as err:
            raise _fail(cfg, "train.lr_multipliers", str(err)) from None


def derive_grad_accum(cfg: RunConfig, *, world_size: int) -> None:
    """With ``train.global_batch_size`` set, fix ``train.grad_accum`` for this world size (in place).

    G = micro-batch x grad-accum x world size; a G that the micro-batch and the world size do not divide is a
    ConfigError naming the key. It overrides any train.grad_accum (a saved run_config.yaml holds the value
    derived for its own world size).
    """
    t = cfg.train
    if not t.global_batch_size:
        return
    per_micro_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_micro_step:
        raise _fail(
            cfg,
            "train.global_batch_size",
            f"{t.global_batch_size} is not a multiple of train.micro_batch_size ({t.micro_batch_size}) x world "
            f"size ({world_size}) = {per_micro_step}; change one of them",
        )
    t.grad_accum = t.global_batch_size // per_micro_step
