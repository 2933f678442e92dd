"""The demo VAE: fitting lowers reconstruction error, latents get unit scale, the cached folder is reused."""

import json
from pathlib import Path

import pytest
import torch

from datapipes.synth import render_object, write_object
from engine.config import load_config
from engine.demo import prepare_demo
from engine.demo.data import demo_shards_dir
from engine.demo.vae import (
    FIT_STATS,
    DemoVAEError,
    demo_components_dir,
    demo_images,
    ensure_demo_components,
    evaluate,
    fit_demo_vae,
)
from modeling.components import load_components, tiny_components

REPO = Path(__file__).resolve().parents[2]
RES = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from 2 threads and slow down a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def samples():
    return [render_object(seed, res=RES) for seed in range(4)]


def test_demo_images_cover_both_domains_and_three_backgrounds(samples):
    images = demo_images(samples, RES)
    views = samples[0].num_views
    assert images.shape == (len(samples) * 3 * 2 * views, 3, RES, RES)
    assert images.dtype == torch.float32 and images.min() >= -1.0 and images.max() <= 1.0
    # corner pixels are background: white (1), black (-1), gray (0) blocks in that order
    block = len(samples) * 2 * views
    corners = images[:, :, 0, 0].mean(dim=1)
    for index, value in enumerate((1.0, -1.0, 0.0)):
        assert torch.allclose(corners[index * block : (index + 1) * block], torch.tensor(value), atol=0.02)


def test_fit_raises_psnr_and_normalises_latents(samples):
    images = demo_images(samples, RES)
    vae = tiny_components(RES, seed=0).vae
    rng_before = torch.random.get_rng_state()
    stats = fit_demo_vae(vae, images, steps=60, batch_size=8, lr=5e-3, seed=0, log=None)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the UNet init downstream is unchanged
    assert stats["psnr"] >= stats["psnr_before"] + 5.0, stats
    psnr, latent_std, _ = evaluate(vae, images)
    assert psnr == pytest.approx(stats["psnr"], abs=1.5)  # the subset figure speaks for the whole set
    scaled_std = latent_std * vae.config.scaling_factor
    assert 0.5 <= scaled_std <= 2.0, (latent_std, vae.config.scaling_factor)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_fit_is_deterministic_from_the_seed(samples):
    images = demo_images(samples[:2], RES)
    fitted = []
    for _ in range(2):
        vae = tiny_components(RES, seed=0).vae
        fit_demo_vae(vae, images, steps=5, batch_size=4, lr=5e-3, seed=3, log=None)
        fitted.append(vae.state_dict())
    assert all(torch.equal(fitted[0][k], fitted[1][k]) for k in fitted[0])


def _demo_config(cache: Path, *overrides: str):
    return load_config(
        REPO / "configs" / "demo_cpu.yaml",
        [
            f"data.resolution={RES}",
            f"data.demo_cache={cache}",
            "data.demo_objects=3",
            "run.seed=1",
            *overrides,
        ],
    )


def _write_renders(cfg, samples) -> None:
    renders = demo_shards_dir(cfg) / "renders"
    for sample in samples[:3]:
        write_object(sample, renders)


def _ensure(cfg, run_dir: Path) -> Path | None:
    return ensure_demo_components(
        cfg, local_rank=0, run_components=run_dir / "components", log=lambda _: None
    )


def test_ensure_fits_once_then_reuses_the_cached_folder(tmp_path, samples, monkeypatch):
    cfg = _demo_config(tmp_path, "model.demo_vae_steps=40")
    _write_renders(cfg, samples)
    folder = _ensure(cfg, tmp_path / "run")
    assert folder == demo_components_dir(cfg)
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    stats = json.loads((folder / FIT_STATS).read_text())
    assert stats["steps"] == 40
    assert not list(folder.parent.glob("*.tmp-*"))  # the temporary folder was renamed into place
    fitted = load_components(folder)
    assert fitted.vae.config.scaling_factor == stats["scaling_factor"]
    tiny = tiny_components(RES, cfg.model.cross_attention_dim, seed=cfg.run.seed)
    assert not torch.equal(fitted.vae.decoder.conv_out.weight, tiny.vae.decoder.conv_out.weight)
    for name in ("image_encoder",):  # the other parts are the run's own seeded tiny ones
        one, two = getattr(fitted, name).state_dict(), getattr(tiny, name).state_dict()
        assert all(torch.equal(one[k], two[k]) for k in one)

    import engine.demo.vae as module

    def no_fitting(*args, **kwargs):
        raise AssertionError("the cached folder should be reused, not fitted again")

    monkeypatch.setattr(module, "fit_demo_vae", no_fitting)
    assert _ensure(cfg, tmp_path / "run") == folder


def test_ensure_prefers_the_components_saved_in_the_run_dir(tmp_path):
    """A resumed run keeps the VAE its UNet was trained with, without fitting or needing the cache."""
    cfg = _demo_config(tmp_path, "model.demo_vae_steps=10")
    (tmp_path / "run" / "components" / "vae").mkdir(parents=True)
    (tmp_path / "run" / "components" / "vae" / "config.json").write_text("{}")
    assert _ensure(cfg, tmp_path / "run") == tmp_path / "run" / "components"
    assert not demo_components_dir(cfg).exists()


@pytest.mark.parametrize(
    "override", ["model.demo_vae_steps=0", "model.pretrained=/some/folder", "model.components=/x"]
)
def test_ensure_is_a_no_op_when_disabled_or_components_are_given(tmp_path, override):
    assert _ensure(_demo_config(tmp_path, "model.demo_vae_steps=10", override), tmp_path / "run") is None


def test_ensure_without_renders_names_the_folder(tmp_path):
    cfg = _demo_config(tmp_path, "model.demo_vae_steps=10")
    with pytest.raises(DemoVAEError, match="renders"):
        _ensure(cfg, tmp_path / "run")


def test_prepare_demo_returns_an_ordinary_config(tmp_path, samples, monkeypatch):
    """The engine sees the demo as data.shards + model.components; a config with its own shards is untouched."""
    cfg = _demo_config(tmp_path, "model.demo_vae_steps=2", "data.workers=1", f"run.dir={tmp_path / 'run'}")
    import engine.demo as demo

    monkeypatch.setattr(demo, "ensure_demo_shards", lambda cfg, local_rank: tmp_path / "manifest.json")
    monkeypatch.setattr(demo, "check_data", lambda cfg, world_size: (1, []))
    monkeypatch.setattr(demo, "ensure_demo_components", lambda cfg, **kw: tmp_path / "parts")
    prepared = prepare_demo(cfg, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert prepared.data.shards == str(tmp_path / "manifest.json")
    assert prepared.model.components == str(tmp_path / "parts")
    assert prepared.source_of("data.shards").startswith("demo") and not cfg.data.shards
    assert prepare_demo(prepared, local_rank=0, world_size=1, device=torch.device("cpu")) is prepared
