"""The training maths of one step, checked against independent references: min-SNR weights (diffusers'
``compute_snr``), the guidance-dropout split, timesteps and noise per image, per-domain loss averaging, and the
LR schedule as DeepSpeed steps it under gradient accumulation."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import compute_snr

from engine.build import build_components
from engine.distributed import init_distributed
from engine.objective import DiffusionObjective, domain_means, domain_sums
from engine.optim import lr_lambda
from engine.randomness import object_generators
from engine.train import run_step
from tests.engine.fixed_batch import fixed_batch_run, global_batch, slice_batch, tiny_config

VIEWS = 6  # configs/demo_cpu.yaml


def objective(*overrides: str) -> DiffusionObjective:
    cfg = tiny_config(*overrides)
    return DiffusionObjective(build_components(cfg), cfg, torch.device("cpu"))


class ZeroUNet(torch.nn.Module):
    """Predicts zeros, so the per-image loss is the weighted mean square of the target."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample, timesteps, clip, class_labels):
        return SimpleNamespace(sample=torch.zeros(sample.shape[0], 4, *sample.shape[2:]))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [5.0, 0.0])
def test_min_snr_weights_match_diffusers_compute_snr(prediction, gamma):
    obj = objective(
        f"train.prediction_type={prediction}",
        f"train.snr_gamma={gamma}",
        "data.mode=mix",
        "model.cd_attention_mid=false",
    )
    inputs = obj.prepare(global_batch(2), object_generators(3, 0, range(2)))
    inputs.timesteps = torch.tensor(
        [0, 1, 50, 200, 500, 700, 900, 999, 120, 400, 650, 998]
    )  # all SNR regimes
    loss, _ = obj.loss(ZeroUNet(), inputs)

    snr = compute_snr(obj.scheduler, inputs.timesteps)
    if gamma:  # Hang et al. 2023 as diffusers' train_text_to_image applies it
        weight = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weight = weight / (snr + 1) if prediction == "v_prediction" else weight / snr
    else:
        weight = torch.ones_like(snr)
    if prediction == "v_prediction":
        target = obj.scheduler.get_velocity(inputs.latents, inputs.noise, inputs.timesteps)
    else:
        target = inputs.noise
    per_image = target.pow(2).mean(dim=(1, 2, 3)) * weight
    torch.testing.assert_close(loss, per_image.mean(), rtol=1e-5, atol=0)
    if gamma:
        assert weight.min() < 0.5 * weight.max(), "the timesteps above must reach the clipped regime"


def test_guidance_dropout_fractions_per_object_and_deterministic():
    obj = objective("train.drop_image_embed=0.1", "train.drop_both=0.2", "train.drop_cond_latent=0.3")
    n = 20_000
    drop_clip, drop_latent = obj._condition_dropout(object_generators(7, 0, range(n)))
    fractions = {
        "clip only": (drop_clip & ~drop_latent).float().mean().item(),
        "both": (drop_clip & drop_latent).float().mean().item(),
        "latent only": (~drop_clip & drop_latent).float().mean().item(),
        "neither": (~drop_clip & ~drop_latent).float().mean().item(),
    }
    expected = {"clip only": 0.1, "both": 0.2, "latent only": 0.3, "neither": 0.4}
    # Binomial sd at n=20000 is at most 0.0035; 0.015 is > 4 sd.
    for name, value in fractions.items():
        assert value == pytest.approx(expected[name], abs=0.015), f"{name}: {fractions}"
    # One draw per object: objects 100..199 drop the same whether drawn in one batch or on another "rank".
    again_clip, again_latent = obj._condition_dropout(object_generators(7, 0, range(100, 200)))
    assert torch.equal(again_clip, drop_clip[100:200]) and torch.equal(again_latent, drop_latent[100:200])
    other_clip, _ = obj._condition_dropout(object_generators(8, 0, range(n)))
    assert not torch.equal(other_clip, drop_clip), "another seed must give other draws"


def test_prepare_zeroes_exactly_the_dropped_conditions():
    obj = objective("train.drop_image_embed=0.3", "train.drop_both=0.3", "train.drop_cond_latent=0.3")
    generators = lambda: object_generators(11, 0, range(8))  # noqa: E731 (fresh generators for each draw)
    drop_clip, drop_latent = obj._condition_dropout(generators())
    assert drop_clip.any() and (~drop_clip).any() and drop_latent.any() and (~drop_latent).any()
    inputs = obj.prepare(global_batch(8), generators())
    clip = inputs.clip_embeds.view(2, 8, VIEWS, -1)  # (domain, object, view, C)
    cond = inputs.cond_latent.view(2, 8, VIEWS, -1)
    assert torch.equal(clip.abs().amax(dim=(0, 2, 3)) == 0, drop_clip)
    assert torch.equal(cond.abs().amax(dim=(0, 2, 3)) == 0, drop_latent)


def test_one_timestep_per_object_and_domain_shared_by_its_views():
    objects = 4
    joint = objective().prepare(global_batch(objects), object_generators(5, 2, range(objects)))
    steps = joint.timesteps.view(2, objects, VIEWS)  # (domain, object, view)
    assert (steps == steps[..., :1]).all(), "views of one object and domain must share the timestep"
    assert len(set(steps[..., 0].flatten().tolist())) == 2 * objects, "independent per (object, domain)"
    mix = objective("data.mode=mix", "model.cd_attention_mid=false").prepare(
        global_batch(objects), object_generators(5, 2, range(objects))
    )
    steps = mix.timesteps.view(objects, VIEWS)
    assert (steps == steps[:, :1]).all() and len(set(steps[:, 0].tolist())) == objects


def test_noise_is_independent_per_image_and_per_object_across_batch_splits():
    objects = 4
    obj = objective()
    whole = obj.prepare(global_batch(objects), object_generators(5, 2, range(objects)))
    noise = whole.noise.flatten(1)  # (2·B·V, 4·h·w)
    corr = torch.corrcoef(noise)
    off_diagonal = corr[~torch.eye(len(corr), dtype=torch.bool)]
    # 64 values per image: |corr| of independent draws exceeds 0.7 with p < 1e-9; a shared draw gives 1.
    assert off_diagonal.abs().max() < 0.7, f"two images share noise (|corr| {off_diagonal.abs().max():.2f})"
    # Objects 2..3 drawn as another rank's micro-batch get the same noise and timesteps as in the whole batch.
    half = obj.prepare(slice_batch(global_batch(objects), 2, 4), object_generators(5, 2, range(2, 4)))
    per_object = whole.noise.view(2, objects, VIEWS, -1)
    torch.testing.assert_close(half.noise.view(2, 2, VIEWS, -1), per_object[:, 2:], rtol=0, atol=0)
    assert torch.equal(half.timesteps.view(2, 2, VIEWS), whole.timesteps.view(2, objects, VIEWS)[:, 2:])


def test_domain_means_average_only_the_images_that_had_the_domain():
    per_image = torch.tensor([1.0, 3.0, 10.0])
    first = domain_sums(per_image, torch.tensor([True, True, False]))  # a micro-batch with both domains
    second = domain_sums(torch.tensor([5.0]), torch.tensor([True]))  # one with normals only (mix mode)
    summed = {k: first[k] + second[k] for k in first}
    assert domain_means(summed) == {"loss_normal": 3.0, "loss_color": 10.0}
    only_normal = domain_means(second)
    assert only_normal == {"loss_normal": 5.0}, "a domain no image had is absent, not NaN"
    assert all(math.isfinite(v) for v in only_normal.values())


def test_lr_warmup_and_cosine_step_once_per_optimizer_step_under_grad_accum():
    info = init_distributed()
    cfg = tiny_config(
        "train.micro_batch_size=1", "train.grad_accum=2", "train.warmup_steps=3", "train.lr_schedule=cosine",
        "run.max_steps=7", "train.lr=1e-3", "train.ema_decay=0",
    )  # fmt: skip
    factor = lr_lambda(cfg)
    # The schedule itself: linear warmup to the base lr, then half a cosine down to 0 at run.max_steps.
    assert [factor(k) for k in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [factor(k) for k in (3, 5, 7)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    run = fixed_batch_run(cfg, info)
    batch = global_batch(1)
    assert run.engine.get_lr()[0] == pytest.approx(1e-3 * factor(0))  # the first group has no multiplier
    base = [lr / factor(0) for lr in run.engine.get_lr()]  # per param group (train.lr_multipliers)
    for k in range(1, 6):
        run_step(run, iter([batch, batch]), k - 1)
        assert run.engine.global_steps == k, "one optimizer step per run_step"
        expected = [b * factor(k) for b in base]
        assert run.engine.get_lr() == pytest.approx(expected, rel=1e-12), f"lr after {k} optimizer steps"
