"""The demo VAE: fitting lowers reconstruction error, latents get unit scale, the cache is reused."""

import json
from pathlib import Path

import pytest
import torch

from datapipes.synth import render_object, write_object
from engine.config import load_config
from engine.demo_data import demo_shards_dir
from engine.demo_vae import (
    FIT_STATS,
    DemoVAEError,
    demo_images,
    demo_vae_dir,
    ensure_demo_vae,
    evaluate,
    fit_demo_vae,
)
from modeling.components import tiny_components

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


def test_ensure_fits_once_then_loads_the_cache(tmp_path, samples, monkeypatch):
    cfg = _demo_config(tmp_path)
    monkeypatch.setattr(cfg.model, "demo_vae_steps", 40, raising=False)
    _write_renders(cfg, samples)
    first = tiny_components(RES, seed=cfg.run.seed)
    stats = ensure_demo_vae(cfg, first, local_rank=0, log=lambda _: None)
    assert stats and stats["steps"] == 40
    folder = demo_vae_dir(cfg)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / FIT_STATS).read_text())["psnr"] == stats["psnr"]
    assert not list(folder.parent.glob("*.tmp-*"))  # the temporary folder was renamed into place

    import engine.demo_vae as module

    def no_fitting(*args, **kwargs):
        raise AssertionError("the cached VAE should be loaded, not fitted again")

    monkeypatch.setattr(module, "fit_demo_vae", no_fitting)
    second = tiny_components(RES, seed=cfg.run.seed)
    assert ensure_demo_vae(cfg, second, local_rank=0, log=lambda _: None) == {}
    one, two = first.vae.state_dict(), second.vae.state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert second.vae.config.scaling_factor == first.vae.config.scaling_factor == stats["scaling_factor"]
    assert not second.vae.training and not any(p.requires_grad for p in second.vae.parameters())


def test_ensure_prefers_the_vae_saved_in_the_run_dir(tmp_path, monkeypatch):
    """A resumed run keeps the VAE its UNet was trained with, without fitting or needing the cache."""
    cfg = _demo_config(tmp_path)
    monkeypatch.setattr(cfg.model, "demo_vae_steps", 10, raising=False)
    saved = tiny_components(RES, seed=7)
    saved.vae.register_to_config(scaling_factor=0.5)
    saved.vae.save_pretrained(tmp_path / "run" / "components" / "vae")
    components = tiny_components(RES, seed=cfg.run.seed)
    assert (
        ensure_demo_vae(cfg, components, local_rank=0, run_components=tmp_path / "run" / "components") == {}
    )
    one, two = saved.vae.state_dict(), components.vae.state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert components.vae.config.scaling_factor == 0.5 and not demo_vae_dir(cfg).exists()


def test_ensure_is_a_no_op_when_disabled_or_pretrained(tmp_path, monkeypatch):
    cfg = _demo_config(tmp_path)
    components = tiny_components(RES, seed=cfg.run.seed)
    before = components.vae
    monkeypatch.setattr(cfg.model, "demo_vae_steps", 0, raising=False)
    assert ensure_demo_vae(cfg, components, local_rank=0) is None
    monkeypatch.setattr(cfg.model, "demo_vae_steps", 10, raising=False)
    monkeypatch.setattr(cfg.model, "pretrained", "/some/folder")
    assert ensure_demo_vae(cfg, components, local_rank=0) is None
    assert components.vae is before


def test_ensure_without_renders_names_the_folder(tmp_path, monkeypatch):
    cfg = _demo_config(tmp_path)
    monkeypatch.setattr(cfg.model, "demo_vae_steps", 10, raising=False)
    with pytest.raises(DemoVAEError, match="renders"):
        ensure_demo_vae(cfg, tiny_components(RES), local_rank=0, log=lambda _: None)
