"""Validation spread over ranks: every rank generates its share, rank 0 gathers; same numbers as 1 rank."""

from types import SimpleNamespace

import pytest
import torch

from engine import validation
from engine.validation import generate_share, initial_noise, object_share, run_validation
from modeling.components import tiny_components
from modeling.pipeline import MVDiffusionPipeline
from modeling.unet_mv import MVUNet, tiny_unet_config

VIEWS, RES, OBJECTS, SEED = 2, 32, 3, 5


@pytest.fixture(scope="module")
def parts():
    components = tiny_components(resolution=RES, cross_attention_dim=32, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = MVUNet.from_config(
            tiny_unet_config(num_views=VIEWS, cd_attention_mid=True, sample_size=RES // 8)
        )
    g = torch.Generator().manual_seed(1)
    batch = {
        "image_cond": torch.rand(OBJECTS, 3, RES, RES, generator=g),
        "camera_embed_normal": torch.randn(OBJECTS, VIEWS, 10, generator=g),
        "camera_embed_image": torch.randn(OBJECTS, VIEWS, 10, generator=g),
        "normal_target": torch.rand(OBJECTS, VIEWS, 3, RES, RES, generator=g),
        "image_target": torch.rand(OBJECTS, VIEWS, 3, RES, RES, generator=g),
    }
    cfg = SimpleNamespace(
        run=SimpleNamespace(seed=SEED),
        validation=SimpleNamespace(steps=2, guidance=1.0, scheduler="ddim"),
    )
    return unet, components, batch, cfg


def test_object_share_splits_every_object_once():
    for objects in range(0, 7):
        for world in (1, 2, 3, 4):
            shares = [object_share(objects, r, world) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(objects)), (objects, world)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_shares_of_two_ranks_equal_one_rank_and_the_batched_pipeline(parts):
    unet, components, batch, cfg = parts
    pipe = MVDiffusionPipeline(unet.eval(), components, scheduler="ddim")
    noise = initial_noise(batch, components, SEED)
    alone = generate_share(pipe, batch, noise, object_share(OBJECTS, 0, 1), cfg)
    merged = {}
    for rank in range(2):
        merged.update(generate_share(pipe, batch, noise, object_share(OBJECTS, rank, 2), cfg))
    assert sorted(merged) == list(range(OBJECTS))
    for i in range(OBJECTS):  # bit-identical: same noise slice, same one-object batch on any world size
        assert torch.equal(merged[i][0], alone[i][0]) and torch.equal(merged[i][1], alone[i][1]), i
    # The noise each object gets is the slice that one batched call with the seed draws (today's numbers).
    camera = torch.stack([batch["camera_embed_normal"], batch["camera_embed_image"]], dim=1)
    batched = pipe(batch["image_cond"], camera, num_inference_steps=2, seed=SEED, progress=False)
    for i in range(OBJECTS):
        torch.testing.assert_close(merged[i][0], batched.normals[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(merged[i][1], batched.colors[i], atol=1e-4, rtol=0)


def test_rank0_assembles_the_gathered_shares_into_the_one_rank_result(parts, tmp_path, monkeypatch):
    unet, components, batch, cfg = parts
    one = run_validation(unet, components, None, batch, cfg, tmp_path / "one.png")
    pipe = MVDiffusionPipeline(unet, components, scheduler="ddim")
    other = generate_share(
        pipe, batch, initial_noise(batch, components, SEED), object_share(OBJECTS, 1, 2), cfg
    )
    seen = {}

    def fake_gather(share, rank, world_size):  # what dist.gather_object hands rank 0
        seen["mine"] = sorted(share)
        return {**share, **other}

    monkeypatch.setattr(validation, "gather_to_main", fake_gather)
    two = run_validation(unet, components, None, batch, cfg, tmp_path / "two.png", rank=0, world_size=2)
    assert seen["mine"] == [0, 2], "rank 0 must generate only its own share"
    assert two == one
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
