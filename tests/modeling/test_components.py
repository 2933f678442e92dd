"""Frozen components: tiny components are deterministic, load/save round-trips, missing parts are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler

from modeling.components import (
    Components,
    ModelFolderError,
    load_components,
    load_model_folder,
    save_components,
    save_model_folder,
    tiny_components,
)


@pytest.fixture(scope="module")
def components() -> Components:
    return tiny_components(resolution=64, cross_attention_dim=32, seed=0)


@pytest.fixture(scope="module")
def saved_folder(components: Components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("components")
    save_components(components, folder)
    return folder


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _public(config: dict) -> dict:
    """Config without diffusers' bookkeeping keys (`_use_default_values` differs after a reload)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_tiny_components_deterministic_and_leave_global_rng(components: Components) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = tiny_components(seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # building models did not consume the caller's RNG
    assert _state_equal(again.vae, components.vae)
    assert _state_equal(again.image_encoder, components.image_encoder)
    other = tiny_components(seed=1)
    assert not _state_equal(other.vae, components.vae)


def test_tiny_components_shapes_and_schedule(components: Components) -> None:
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latent = components.vae.encode(image).latent_dist.mode()
        embeds = components.image_encoder(torch.randn(2, 3, 224, 224)).image_embeds
    assert latent.shape == (2, 4, 8, 8)  # 8x downsampling, 4 latent channels
    assert embeds.shape == (2, 32)  # projection_dim = cross_attention_dim
    scheduler = components.noise_scheduler
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.prediction_type == "epsilon"
    assert len(scheduler.betas) == 1000
    assert scheduler.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert scheduler.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    # scaled_linear = linear in sqrt(beta)
    sqrt_betas = scheduler.betas.double().sqrt()
    assert torch.allclose(sqrt_betas.diff(), sqrt_betas.diff()[0].expand(999), rtol=1e-4)
    assert not any(p.requires_grad for p in components.vae.parameters())
    assert components.feature_extractor.crop_size == {"height": 224, "width": 224}


def test_save_load_round_trip(components: Components, saved_folder: Path) -> None:
    loaded = load_components(saved_folder)
    assert _state_equal(loaded.vae, components.vae)
    assert _state_equal(loaded.image_encoder, components.image_encoder)
    assert _public(loaded.noise_scheduler.config) == _public(components.noise_scheduler.config)
    assert loaded.feature_extractor.image_mean == components.feature_extractor.image_mean
    assert (saved_folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved_folder / "image_encoder" / "model.safetensors").is_file()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(
            loaded.vae.encode(image).latent_dist.mode(), components.vae.encode(image).latent_dist.mode()
        )


@pytest.mark.parametrize("missing", ["vae", "image_encoder", "scheduler", "feature_extractor"])
def test_missing_subfolder_is_named(saved_folder: Path, tmp_path: Path, missing: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(saved_folder, folder)
    shutil.rmtree(folder / missing)
    with pytest.raises(ModelFolderError, match=f"'{missing}/'"):
        load_components(folder)


def test_missing_folder_and_optional_feature_extractor(saved_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_components(tmp_path / "nowhere")
    folder = tmp_path / "model"
    shutil.copytree(saved_folder, folder)
    shutil.rmtree(folder / "feature_extractor")
    assert load_components(folder, require_feature_extractor=False).feature_extractor is None


def test_sd_image_variations_pndm_scheduler_and_legacy_extractor(saved_folder: Path, tmp_path: Path) -> None:
    # sd-image-variations ships a PNDM scheduler config; training needs it as DDPM with the same betas.
    folder = tmp_path / "model"
    shutil.copytree(saved_folder, folder)
    shutil.rmtree(folder / "scheduler")
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    ).save_pretrained(folder / "scheduler")
    # and its feature extractor config is the legacy CLIPFeatureExtractor format (ints for sizes)
    shutil.rmtree(folder / "feature_extractor")
    (folder / "feature_extractor").mkdir()
    legacy = {"crop_size": 224, "size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}  # fmt: skip
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(legacy))
    loaded = load_components(folder)
    assert loaded.feature_extractor.crop_size["height"] == 224
    assert tuple(loaded.feature_extractor.image_std) == pytest.approx(legacy["image_std"])
    scheduler = loaded.noise_scheduler
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert scheduler.config.steps_offset == 1


def test_model_folder_round_trip(components: Components, tmp_path: Path) -> None:
    from modeling.unet_mv import MVUNet, tiny_unet_config

    unet = MVUNet.from_config(tiny_unet_config(num_views=2))
    save_model_folder(components, unet, tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["modeling.unet_mv", "MVUNet"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    loaded_components, loaded_unet = load_model_folder(tmp_path)
    assert isinstance(loaded_unet, MVUNet) and not loaded_unet.training
    assert _state_equal(loaded_unet, unet)
    assert _state_equal(loaded_components.image_encoder, components.image_encoder)
    shutil.rmtree(tmp_path / "unet")
    with pytest.raises(ModelFolderError, match="'unet/'"):
        load_model_folder(tmp_path)
