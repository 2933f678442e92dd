"""MVDiffusionPipeline: shapes, ranges, seeding, CFG branches in the batch layout, schedulers."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from modeling.components import Components, ModelFolderError, tiny_components
from modeling.layout import split_domains, stack_domains
from modeling.pipeline import MVDiffusionPipeline, PipelineError, guide, make_scheduler, view_grid
from modeling.unet_mv import MVUNet, tiny_unet_config
from tests.modeling.wonder3d_checkpoint import reference_unet, write_wonder3d_model_folder

VIEWS = 2
RES = 64  # tiny VAE: 8x8 latents


@pytest.fixture(scope="module")
def components() -> Components:
    return tiny_components(resolution=RES, cross_attention_dim=32, seed=0)


@pytest.fixture(scope="module")
def pipe(components: Components) -> MVDiffusionPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = MVUNet.from_config(tiny_unet_config(num_views=VIEWS, cd_attention_mid=True))
    return MVDiffusionPipeline(unet, components)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, RES, RES, generator=generator)
    camera = torch.randn(2, VIEWS, 10, generator=generator)  # [domain (normal, color), V, 10]
    return image, camera


class UNetSpy:
    """Records the keyword/positional inputs of every UNet call, then runs the real forward."""

    def __init__(self, unet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        self._forward = unet.forward
        monkeypatch.setattr(unet, "forward", self)

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, **kwargs):
        self.calls.append(
            {"sample": sample, "timestep": timestep, "context": encoder_hidden_states, "labels": class_labels}
        )
        return self._forward(sample, timestep, encoder_hidden_states, class_labels=class_labels, **kwargs)


def test_shapes_ranges_and_seed(pipe: MVDiffusionPipeline, inputs) -> None:
    image, camera = inputs
    out = pipe(image, camera, num_inference_steps=1, guidance_scale=1.0, seed=3, progress=False)
    assert out.normals.shape == (2, VIEWS, 3, RES, RES) and out.colors.shape == (2, VIEWS, 3, RES, RES)
    for views in (out.normals, out.colors):
        assert views.dtype == torch.float32 and torch.isfinite(views).all()
        assert views.min() >= 0.0 and views.max() <= 1.0
    again = pipe(image, camera, num_inference_steps=1, guidance_scale=1.0, seed=3, progress=False)
    assert torch.equal(out.normals, again.normals) and torch.equal(out.colors, again.colors)
    other = pipe(image, camera, num_inference_steps=1, guidance_scale=1.0, seed=4, progress=False)
    assert not torch.equal(out.colors, other.colors)
    generator = torch.Generator().manual_seed(3)
    via_generator = pipe(image, camera, num_inference_steps=1, generator=generator, progress=False)
    assert torch.equal(via_generator.colors, out.colors)


def test_guidance_one_is_a_single_conditional_pass(pipe, inputs, monkeypatch) -> None:
    image, camera = inputs
    spy = UNetSpy(pipe.unet, monkeypatch)
    pipe(image, camera, num_inference_steps=2, guidance_scale=1.0, seed=0, progress=False)
    assert len(spy.calls) == 2
    call = spy.calls[0]
    rows = 2 * 2 * VIEWS  # 2 domains x B objects x V views
    assert call["sample"].shape == (rows, 8, RES // 8, RES // 8)
    assert call["timestep"].shape == (rows,)
    clip_embeds, cond_latent = pipe.encode_condition(image)
    normal_ctx, color_ctx = split_domains(call["context"], 2, VIEWS)
    assert torch.equal(normal_ctx[1, 0], clip_embeds[1]) and torch.equal(color_ctx[0, 1], clip_embeds[0])
    normal_cond, color_cond = split_domains(call["sample"][:, 4:], 2, VIEWS)
    assert torch.allclose(normal_cond[1, 1], cond_latent[1]) and torch.allclose(
        color_cond[0, 0], cond_latent[0]
    )
    normal_labels, color_labels = split_domains(call["labels"], 2, VIEWS)
    assert torch.equal(normal_labels[1], camera[0]) and torch.equal(color_labels[1], camera[1])


def test_cfg_unconditional_branch_zeroes_embedding_and_latent(pipe, inputs, monkeypatch) -> None:
    image, camera = inputs
    spy = UNetSpy(pipe.unet, monkeypatch)
    pipe(image, camera, num_inference_steps=2, guidance_scale=3.0, seed=0, progress=False)
    assert len(spy.calls) == 2  # both branches in one batched call per step
    call = spy.calls[0]
    assert call["sample"].shape[0] == 2 * 4 * VIEWS  # 2 domains x (2 branches x B=2) x V
    clip_embeds, cond_latent = pipe.encode_condition(image)
    # objects [0, B) = unconditional, [B, 2B) = conditional; both domain halves in the same object order
    for half in split_domains(call["context"], 4, VIEWS):
        assert torch.count_nonzero(half[:2]) == 0
        assert torch.equal(half[2:, 0], clip_embeds) and torch.equal(half[3, 1], clip_embeds[1])
    noisy, cond = call["sample"][:, :4], call["sample"][:, 4:]
    for half in split_domains(cond, 4, VIEWS):
        assert torch.count_nonzero(half[:2]) == 0
        assert torch.allclose(half[2:, 1], cond_latent)
    for half in split_domains(noisy, 4, VIEWS):
        assert torch.equal(half[:2], half[2:])  # both branches denoise the same latents
    normal_labels, color_labels = split_domains(call["labels"], 4, VIEWS)
    assert torch.equal(normal_labels, camera[0].expand(4, VIEWS, 10))
    assert torch.equal(color_labels, camera[1].expand(4, VIEWS, 10))
    assert torch.count_nonzero(clip_embeds) > 0 and torch.count_nonzero(cond_latent) > 0


def test_guidance_changes_output_and_is_seeded(pipe, inputs) -> None:
    image, camera = inputs
    image = image[:1]
    kwargs = {"num_inference_steps": 1, "seed": 1, "progress": False}
    plain = pipe(image, camera, guidance_scale=1.0, **kwargs)
    guided = pipe(image, camera, guidance_scale=3.0, **kwargs)
    guided_again = pipe(image, camera, guidance_scale=3.0, **kwargs)
    assert torch.equal(guided.colors, guided_again.colors)
    assert not torch.allclose(plain.colors, guided.colors)


def test_guide_formula_per_domain() -> None:
    batch, views = 2, 3
    pred = torch.randn(2 * 2 * batch * views, 4, 2, 2)
    normal, color = split_domains(pred, 2 * batch, views)
    out_normal, out_color = split_domains(guide(pred, batch, views, 2.5), batch, views)
    assert torch.allclose(out_normal, normal[:batch] + 2.5 * (normal[batch:] - normal[:batch]))
    assert torch.allclose(out_color, color[:batch] + 2.5 * (color[batch:] - color[:batch]))


@pytest.mark.parametrize("name", ["dpm", "euler"])
def test_other_schedulers_run(pipe, inputs, name: str) -> None:
    image, camera = inputs
    out = pipe(
        image[:1], camera, num_inference_steps=2, guidance_scale=2.0, seed=0, scheduler=name, progress=False
    )
    assert out.colors.shape == (1, VIEWS, 3, RES, RES) and torch.isfinite(out.colors).all()


def test_scheduler_config_and_errors(pipe, components, inputs) -> None:
    ddim = make_scheduler("ddim", components.noise_scheduler.config)
    assert ddim.config.set_alpha_to_one is False and ddim.config.beta_schedule == "scaled_linear"
    with pytest.raises(PipelineError, match="scheduler 'plms' is unknown"):
        make_scheduler("plms", components.noise_scheduler.config)
    image, camera = inputs
    with pytest.raises(PipelineError, match="camera_embedding"):
        pipe(image, camera[0], num_inference_steps=1, progress=False)
    with pytest.raises(PipelineError, match="the UNet expects 2"):
        pipe(image, torch.zeros(2, 3, 10), num_inference_steps=1, progress=False)
    with pytest.raises(PipelineError, match="multiples of 8"):
        pipe(image[..., :60], camera, num_inference_steps=1, progress=False)


def test_training_mode_is_restored_and_grid_layout(pipe, inputs) -> None:
    image, camera = inputs
    pipe.unet.train()
    try:
        out = pipe(image[:1], camera, num_inference_steps=1, seed=0, progress=False)
        assert pipe.unet.training  # the engine validates with its training UNet
    finally:
        pipe.unet.eval()
    grid = view_grid(out.normals[0], out.colors[0], condition=image[0])
    assert grid.shape == (3, 2 * RES, (VIEWS + 1) * RES)
    assert torch.equal(grid[:, :RES, :RES], image[0]) and torch.equal(grid[:, RES:, :RES], image[0])
    assert torch.equal(grid[:, :RES, RES : 2 * RES], out.normals[0, 0])
    assert torch.equal(grid[:, RES:, -RES:], out.colors[0, -1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision_is_finite_and_seeded(pipe, inputs) -> None:
    image, camera = inputs
    pipe.to("cuda", torch.float16)
    try:
        first = pipe(image, camera, num_inference_steps=3, guidance_scale=3.0, seed=2, progress=False)
        second = pipe(image, camera, num_inference_steps=3, guidance_scale=3.0, seed=2, progress=False)
    finally:
        pipe.to("cpu", torch.float32)
    assert first.colors.device.type == "cpu" and first.colors.dtype == torch.float32
    assert torch.isfinite(first.colors).all() and torch.isfinite(first.normals).all()
    # CPU-drawn noise: the same seed gives the same samples (up to GPU kernel nondeterminism)
    assert torch.allclose(first.colors, second.colors, atol=1e-3)


def test_objects_in_a_batch_do_not_interact(pipe, inputs) -> None:
    # Same initial noise rows -> object 0 comes out the same alone or next to object 1 (with CFG), which
    # checks that noise, condition, camera and guidance rows stay aligned per object through the layout.
    image, camera = inputs
    noise = torch.randn(2 * 2 * VIEWS, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    normal, color = split_domains(noise, 2, VIEWS)
    kwargs = {"num_inference_steps": 1, "guidance_scale": 2.0, "progress": False}
    both = pipe(image, camera, latents=noise, **kwargs)
    alone = pipe(image[:1], camera, latents=stack_domains(normal[:1], color[:1]), **kwargs)
    assert torch.allclose(both.normals[:1], alone.normals, atol=1e-5)
    assert torch.allclose(both.colors[:1], alone.colors, atol=1e-5)
    with pytest.raises(PipelineError, match="latents must have shape"):
        pipe(image, camera, latents=noise[:4], **kwargs)


def test_from_pretrained_loads_a_wonder3d_unet_with_legacy_names(
    components: Components, inputs, tmp_path
) -> None:
    weights = write_wonder3d_model_folder(tmp_path, components)
    loaded = MVDiffusionPipeline.from_pretrained(tmp_path)
    reference = MVDiffusionPipeline(reference_unet(weights), components)
    image, camera = inputs
    kwargs = {"num_inference_steps": 2, "guidance_scale": 2.0, "seed": 3, "progress": False}
    out, expected = loaded(image, camera, **kwargs), reference(image, camera, **kwargs)
    assert torch.isfinite(out.normals).all() and torch.isfinite(out.colors).all()
    assert torch.equal(out.normals, expected.normals) and torch.equal(out.colors, expected.colors)


def test_from_pretrained_refuses_a_unet_with_a_missing_key(components: Components, tmp_path) -> None:
    weights = write_wonder3d_model_folder(tmp_path, components)
    del weights["conv_in.bias"]
    torch.save(weights, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=rf"{tmp_path}.*1 missing keys \['conv_in.bias'\]"):
        MVDiffusionPipeline.from_pretrained(tmp_path)
