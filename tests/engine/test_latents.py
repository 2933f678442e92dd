"""Training from cached latents (data.source=latents): the same losses as the pixel path, refusals of latents
that do not fit the run, and mix mode encoding only the domain each object trains."""

import json

import pytest
import torch

from datapipes.latent_stream import build_latent_train_loader
from datapipes.shards import build_train_loader
from engine.build import build_components
from engine.config import ConfigError, load_config, load_ds_config
from engine.demo.data import ensure_demo_shards
from engine.distributed import free_port, init_distributed
from engine.encoding import EncodeOptions, encode_shards, plan_encode
from engine.objective import DiffusionObjective
from engine.preflight import check_run
from engine.randomness import object_generators
from engine.train import _transform, run_step, train
from tests.engine.fixed_batch import fixed_batch_run, global_batch
from tests.engine.runs import REPO, TINY, launch, losses_by_step

STEPS = 3
# fp16 storage of the posterior (mean, logvar): relative rounding 2^-11 ≈ 4.9e-4 per value. Measured on
# these runs: ≤ 7.8e-6 relative in the per-step loss (in-process joint; mix 9.5e-7) and 2.4e-6 (2 ranks);
# bound 1e-4, ~13× the largest. A latents path without the posterior noise (std·eps) is off by 5.3e-3.
LOSS_RTOL = 1e-4


def demo_config(cache, *overrides: str):
    """The launched tests' tiny demo config (tests/engine/runs.py TINY), in this process."""
    return load_config(
        REPO / "configs" / "demo_cpu.yaml", [*TINY, "run.dir=unused", f"data.demo_cache={cache}", *overrides]
    )


@pytest.fixture(scope="module")
def demo_latents(demo_cache, tmp_path_factory):
    """(pixel manifest, latents folder) of the tiny demo data, encoded with the run's own tiny VAE/CLIP."""
    cfg = demo_config(demo_cache)
    manifest = ensure_demo_shards(cfg, local_rank=0)
    out = tmp_path_factory.mktemp("latents") / "out"
    opts = EncodeOptions(resolution=cfg.data.resolution, clip_size=cfg.data.clip_size)
    names = {"vae": "tiny", "clip": "tiny"}
    encode_shards(plan_encode(manifest, out, opts), build_components(cfg), opts, names)
    return manifest, out


def _losses(cfg, loader) -> list[float]:
    run = fixed_batch_run(cfg, init_distributed())
    batches = iter(loader)
    return [float(run_step(run, batches, step)["loss"]) for step in range(STEPS)]


def _loader(cfg, source: str, shards):
    build = build_latent_train_loader if source == "latents" else build_train_loader
    return build(
        str(shards), batch_size=cfg.train.micro_batch_size, rank=0, world_size=1, seed=cfg.run.seed,
        transform=_transform(cfg, cfg.data.background), workers=0, shuffle_buffer=cfg.data.shuffle_buffer,
    )  # fmt: skip


def _worst_gap(pixels: list[float], latents: list[float]) -> float:
    return max(abs(a - b) / abs(a) for a, b in zip(pixels, latents, strict=True))


@pytest.mark.parametrize("mode", ["joint", "mix"])
def test_latents_give_the_pixel_losses_in_process(demo_latents, demo_cache, mode):
    manifest, out = demo_latents
    mix = ["data.mode=mix", "model.cd_attention_mid=false"] if mode == "mix" else []
    cfg = demo_config(demo_cache, "train.micro_batch_size=2", *mix)
    pixels = _losses(cfg, _loader(cfg, "pixels", manifest))
    latents = _losses(cfg, _loader(cfg, "latents", out))
    gap = _worst_gap(pixels, latents)
    print(f"{mode}: pixels {pixels}\n{mode}: latents {latents}\nworst relative gap {gap:.2e}")
    assert gap < LOSS_RTOL, f"latents path losses {latents} differ from the pixel path's {pixels}"
    assert len(set(pixels)) == STEPS, "the steps must see different data and noise"


@pytest.mark.slow
@pytest.mark.multiproc
def test_latents_on_two_ranks_zero2_give_the_pixel_losses(demo_latents, demo_cache, tmp_path):
    """Latents through the launcher on 2 ranks (ZeRO-2) vs pixels on 1 rank x grad_accum 2: the same global
    batch, so the same objects and noise (engine.randomness); 1 vs 2 ranks alone differ by ~1e-7 relative
    (tests/engine/test_training.py). One launch instead of two keeps the suite's time down."""
    manifest, out = demo_latents
    run_dir = tmp_path / "latents"
    proc = launch(
        run_dir, demo_cache, "data.source=latents", f"data.shards={out}", f"run.max_steps={STEPS}",
        "checkpoint.every=100", nproc=2, port=free_port(), ds="zero2.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    latents = [losses_by_step(run_dir)[step]["loss"] for step in range(1, STEPS + 1)]
    cfg = demo_config(demo_cache, "train.grad_accum=2")
    pixels = _losses(cfg, _loader(cfg, "pixels", manifest))
    gap = _worst_gap(pixels, latents)
    print(f"pixels 1 rank {pixels}\nlatents 2 ranks {latents}\nworst relative gap {gap:.2e}")
    assert gap < LOSS_RTOL, f"2-rank latents losses {latents} differ from the pixel path's {pixels}"
    assert (run_dir / "validation").is_dir(), "validation must still run (on the pixel shards)"


def test_other_encoder_is_refused_naming_both_hashes(demo_latents, demo_cache, tmp_path, capfd):
    _, out = demo_latents
    stored = json.loads((out / "latents.json").read_text())["encoder"]["hash"]
    # run.seed 7 builds other random tiny VAE/CLIP weights than the seed they were encoded with
    cfg = demo_config(demo_cache, "data.source=latents", f"data.shards={out}", f"run.dir={tmp_path / 'run'}")
    cfg.run.seed, cfg.run.max_steps = 7, 1  # max_steps: cheap even when the check is broken
    ds = REPO / "ds_configs" / "zero2.json"
    code = train(cfg, load_ds_config(ds), str(ds))
    lines = [line for line in capfd.readouterr().err.splitlines() if stored in line]
    assert code == 2, f"exit {code}"
    assert len(lines) == 1 and "data.shards" in lines[0], lines
    mine = lines[0].split("this run's VAE/CLIP is ")[1].split(":")[0]
    assert len(mine) == 64 and mine != stored, lines[0]


def _refusal(cfg) -> str:
    with pytest.raises(ConfigError) as error:
        check_run(cfg, world_size=1)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_latents_that_do_not_cover_the_run_are_refused(demo_latents, demo_cache, tmp_path):
    _, out = demo_latents
    source = [f"data.shards={out}", "data.source=latents", f"run.dir={tmp_path / 'run'}"]
    message = _refusal(demo_config(demo_cache, *source, "data.resolution=64"))
    assert "data.resolution" in message and str(out / "latents.json") in message, message
    message = _refusal(demo_config(demo_cache, *source, "data.clip_size=112"))
    assert "data.clip_size" in message, message

    partial = tmp_path / "white_only"  # the same shards, encoded for white only
    partial.mkdir()
    (partial / "train").symlink_to(out / "train")
    latents = json.loads((out / "latents.json").read_text())
    (partial / "latents.json").write_text(json.dumps({**latents, "backgrounds": ["white"]}))
    cfg = demo_config(demo_cache, *source, f"data.shards={partial}")
    message = _refusal(cfg)
    assert "data.background" in message and "'black'" in message and str(partial) in message, message
    check_run(
        demo_config(demo_cache, *source, f"data.shards={partial}", "data.background=white"), world_size=1
    )

    (partial / "latents.json").write_text(json.dumps({**latents, "complete": False}))
    message = _refusal(demo_config(demo_cache, *source, f"data.shards={partial}"))
    assert "incomplete" in message and "data.shards" in message, message


def test_data_shards_of_the_other_source_are_refused(demo_latents, demo_cache, tmp_path):
    manifest, out = demo_latents
    with pytest.raises(ConfigError, match=r"is a latents folder .* set data\.source=latents"):
        demo_config(demo_cache, f"data.shards={out}")
    with pytest.raises(ConfigError, match=r"data\.shards: .* is not a latents folder"):
        demo_config(demo_cache, f"data.shards={manifest.parent}", "data.source=latents")
    with pytest.raises(ConfigError, match=r"data\.source: latents, but data\.shards is empty"):
        demo_config(demo_cache, "data.source=latents")


class CountingVAE(torch.nn.Module):
    """The VAE, counting the images it encodes."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.images = vae, 0
        self.config, self.dtype = vae.config, vae.dtype

    def encode(self, images):
        self.images += images.shape[0]
        return self.vae.encode(images)


def test_mix_mode_encodes_only_the_domain_each_object_trains():
    cfg = load_config(
        REPO / "configs" / "demo_cpu.yaml",
        ["data.resolution=32", "data.mode=mix", "model.cd_attention_mid=false"],
    )
    components = build_components(cfg)
    objective = DiffusionObjective(components, cfg, torch.device("cpu"))
    objective.vae = CountingVAE(components.vae)
    objects, views = cfg.train.micro_batch_size, len(cfg.data.views)  # the demo shape: 2 objects x 6 views
    objective.prepare(global_batch(objects), object_generators(0, 0, range(objects)))
    # condition images + one domain's target views (Wonder3D's stage 1 trains 12 images of the 2 x 6)
    assert objective.vae.images == objects + objects * views, (
        f"{objective.vae.images} images VAE-encoded, want {objects} conditions + {objects * views} targets"
    )
