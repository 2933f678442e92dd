"""Wonder3D's two stages: mix-mode stage 1, then stage 2 adding cd_attention_mid and training only it."""

import pytest
import torch

from engine.distributed import init_distributed
from engine.objective import choose_normal_domain
from engine.randomness import object_generators
from engine.sources import run_weights
from tests.engine.fixed_batch import fixed_batch_run, global_batch, tiny_config
from tests.engine.runs import train

STAGE1 = ["data.mode=mix", "model.cd_attention_mid=false", "run.max_steps=3", "checkpoint.every=3"]


@pytest.mark.slow
def test_stage1_then_stage2_trains_only_the_new_layers(tmp_path, demo_cache):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train(stage1, demo_cache, *STAGE1, "train.ema_decay=0.9")
    out = train(
        stage2, demo_cache, f"model.unet={stage1}", "model.cd_attention_mid=true", "data.mode=joint",
        "train.trainable=[*joint_mid*]", "run.max_steps=3", "checkpoint.every=3", "train.ema_decay=0",
    )  # fmt: skip
    assert "added" in out.stdout and "cross-domain" in out.stdout
    _, before, _ = run_weights(stage1)  # stage 2 starts from stage 1's EMA weights
    _, after, _ = run_weights(stage2, use_ema=False)
    new = {k for k in after if "joint_mid" in k}
    assert new and not (new & before.keys()), "stage 1 must not have cross-domain layers"
    assert before.keys() == after.keys() - new
    for key in before:  # every stage-1 weight is frozen in stage 2: bit-identical
        assert torch.equal(before[key], after[key]), key
    out_proj = [k for k in new if k.endswith("attn_joint_mid.to_out.0.weight")]
    assert out_proj and all(after[k].abs().max() > 0 for k in out_proj), (
        "zero-initialised layers never trained"
    )


def test_optimizer_state_covers_only_trainable_parameters():
    info = init_distributed()
    run = fixed_batch_run(tiny_config("train.trainable=[*joint_mid*]"), info)
    unet = run.engine.module
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    assert 0 < trainable < total / 5
    partitions = run.engine.optimizer.single_partition_of_fp32_groups  # ZeRO-2's fp32 master copy
    held = sum(p.numel() for p in partitions)
    assert trainable <= held < trainable + 64 * len(partitions)  # alignment padding only


def test_mix_mode_domains_are_fair_coins():
    draws = torch.cat([choose_normal_domain(object_generators(0, step, range(8))) for step in range(250)])
    assert abs(draws.float().mean().item() - 0.5) < 0.05  # 2000 draws: 5 % is > 4 standard deviations


def test_mix_mode_marks_each_object_with_its_domain_one_hot():
    info = init_distributed()
    run = fixed_batch_run(tiny_config("data.mode=mix", "model.cd_attention_mid=false"), info)
    batch = global_batch(4)
    inputs = run.objective.prepare(batch, object_generators(0, 1, range(4)))
    views = batch["camera_embed_image"].shape[1]
    # The last 4 of the 10 values are sin/cos of the domain one-hot: normal = [1, 0], color = [0, 1].
    normal_hot = torch.sin(torch.tensor([1.0, 0.0]))
    for i, is_normal in enumerate(inputs.is_normal[::views].tolist()):
        rows = inputs.camera[i * views : (i + 1) * views]
        source = batch["camera_embed_normal" if is_normal else "camera_embed_image"][i]
        assert torch.equal(rows, source)
        assert torch.allclose(rows[:, 3:5], normal_hot if is_normal else normal_hot.flip(0))
    assert inputs.latents.shape[0] == 4 * views  # B·V images: one domain per object


def test_lr_multipliers_make_one_group_per_pattern():
    from engine.build import build_unet
    from engine.optim import param_groups

    cfg = tiny_config("train.lr=1e-3", "train.lr_multipliers=[class_embedding.*=10, *joint_mid*=0.5]")
    unet = build_unet(cfg)
    groups = {g["name"]: g for g in param_groups(unet, cfg)}
    assert groups["class_embedding.*"]["lr"] == pytest.approx(1e-2)
    assert groups["*joint_mid*"]["lr"] == pytest.approx(5e-4)
    assert groups["*"]["lr"] == pytest.approx(1e-3)
    named = dict(unet.named_parameters())
    assert {id(p) for p in groups["class_embedding.*"]["params"]} == {
        id(p) for n, p in named.items() if n.startswith("class_embedding.")
    }
    assert sum(len(g["params"]) for g in groups.values()) == len(named)
