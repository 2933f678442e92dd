"""Loading: (a) from a 2D UNet folder, (b) from a Wonder3D checkpoint folder, (c) our own round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from modeling.convert_2d import WeightsError, load_from_2d_unet
from modeling.unet_mv import MVUNet, tiny_unet_config
from modeling.wonder3d_keys import load_unet, load_wonder3d_unet, rename_legacy_key

WIDTHS, CTX, HEADS = (32, 64), 32, 4
TINY_2D = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": list(WIDTHS),
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": HEADS,
    "cross_attention_dim": CTX,
}


def inputs(n: int, in_channels: int, seed: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, in_channels, 8, 8, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randn(n, 1, CTX, generator=g),
        torch.randn(n, 10, generator=g),
    )


# ---------------------------------------------------------------- (a) from a 2D UNet


def test_from_2d_unet_reproduces_2d_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    unet_2d = UNet2DConditionModel(**TINY_2D)
    unet_2d.save_pretrained(tmp_path / "unet")  # sd-image-variations layout: pipeline folder with unet/
    unet, report = load_from_2d_unet(
        tmp_path, num_views=1, cd_attention_mid=True, cd_attention_last=True, zero_init_class_embedding=True
    )
    printed = capsys.readouterr().out
    assert "missing keys" in printed and "conv_in widened 4->8" in printed
    new_keys = {k for k in unet.state_dict() if k.startswith("class_embedding.") or "_joint_" in k}
    assert (
        set(report.missing) == new_keys and len(new_keys) == 4 + 4 * 2 * 7
    )  # 4 blocks x 2 joint layers x (q,k,v,out w+b, norm w+b)
    assert report.unexpected == []
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    sample, t, ctx, cam = inputs(2, 4)  # 2 = the two domain halves of one single-view object
    with torch.no_grad():
        expected = unet_2d(sample, t, ctx).sample
        got = unet(torch.cat([sample, torch.zeros_like(sample)], 1), t, ctx, cam).sample
    err = (got - expected).abs().max().item()
    print(f"2D-init max |Δ| = {err:.2e}")
    assert err < 1e-5


def test_from_2d_unet_needs_a_config(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"config\.json"):
        load_from_2d_unet(tmp_path)


# ---------------------------------------------------------------- (b) Wonder3D checkpoint


def wonder3d_reference_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Wonder3D's UNetMV2DConditionModel, derived from its module structure.

    Written independently of MVUNet: SD-style UNet (conv projections, GEGLU feed-forward, no attention
    biases), projection class embedding, and the legacy stage-2 names ``attn_joint_twice``/``norm_joint_twice``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    c0, temb, ctx = (
        config["block_out_channels"][0],
        4 * config["block_out_channels"][0],
        config["cross_attention_dim"],
    )

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def conv(name: str, n_in: int, n_out: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n_out, n_in, k, k), (n_out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name: str, n_in: int, n_out: int) -> None:
        (
            norm(f"{name}.norm1", n_in),
            conv(f"{name}.conv1", n_in, n_out, 3),
            linear(f"{name}.time_emb_proj", temb, n_out),
        )
        norm(f"{name}.norm2", n_out), conv(f"{name}.conv2", n_out, n_out, 3)
        if n_in != n_out:
            conv(f"{name}.conv_shortcut", n_in, n_out, 1)

    def attention(name: str, c: int, kv_dim: int) -> None:
        linear(f"{name}.to_q", c, c, False), linear(f"{name}.to_k", kv_dim, c, False)
        linear(f"{name}.to_v", kv_dim, c, False), linear(f"{name}.to_out.0", c, c)

    def transformer(name: str, c: int) -> None:
        norm(f"{name}.norm", c), conv(f"{name}.proj_in", c, c, 1), conv(f"{name}.proj_out", c, c, 1)
        b = f"{name}.transformer_blocks.0"
        (
            norm(f"{b}.norm1", c),
            attention(f"{b}.attn1", c, c),
            norm(f"{b}.norm2", c),
            attention(f"{b}.attn2", c, ctx),
        )
        norm(f"{b}.norm3", c), linear(f"{b}.ff.net.0.proj", c, 8 * c), linear(f"{b}.ff.net.2", 4 * c, c)
        if config.get("joint_attention_twice"):
            attention(f"{b}.attn_joint_twice", c, c), norm(f"{b}.norm_joint_twice", c)

    conv("conv_in", config["in_channels"], c0, 3)
    linear("time_embedding.linear_1", c0, temb), linear("time_embedding.linear_2", temb, temb)
    linear("class_embedding.linear_1", 10, temb), linear("class_embedding.linear_2", temb, temb)
    widths, layers = config["block_out_channels"], config["layers_per_block"]
    for i, kind in enumerate(config["down_block_types"]):
        n_in = widths[max(i - 1, 0)]
        for j in range(layers):
            resnet(f"down_blocks.{i}.resnets.{j}", n_in if j == 0 else widths[i], widths[i])
            if kind.startswith("CrossAttn"):
                transformer(f"down_blocks.{i}.attentions.{j}", widths[i])
        if i < len(widths) - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", widths[i], widths[i], 3)
    resnet("mid_block.resnets.0", widths[-1], widths[-1]), transformer("mid_block.attentions.0", widths[-1])
    resnet("mid_block.resnets.1", widths[-1], widths[-1])
    rev = list(reversed(widths))
    for i, kind in enumerate(config["up_block_types"]):
        prev, out, skip_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, len(rev) - 1)]
        for j in range(layers + 1):
            skip = skip_in if j == layers else out
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out) + skip, out)
            if kind.startswith("CrossAttn"):
                transformer(f"up_blocks.{i}.attentions.{j}", out)
        if i < len(rev) - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", out, out, 3)
    norm("conv_norm_out", c0), conv("conv_out", c0, config["out_channels"], 3)
    return shapes


def wonder3d_config() -> dict:
    """A tiny config.json in Wonder3D's released format (legacy key, MV block names, diffusers 0.19 keys)."""
    return {
        "_class_name": "UNetMV2DConditionModel",
        "_diffusers_version": "0.19.3",
        **{k: v for k, v in TINY_2D.items() if k not in ("down_block_types", "up_block_types")},
        "in_channels": 8,
        "down_block_types": ["CrossAttnDownBlockMV2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlockMV2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlockMV2D"],
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 10,
        "num_views": 2,
        "joint_attention": False,
        "joint_attention_twice": True,
        "multiview_attention": True,
        "sparse_mv_attention": False,
        "mvcd_attention": False,
        "resnet_out_scale_factor": 1.0,
        "addition_embed_type_num_heads": 64,
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "time_embedding_type": "positional",
    }


def test_wonder3d_checkpoint_loads_without_missing_or_unexpected(tmp_path: Path) -> None:
    config = wonder3d_config()
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) * 0.05 for k, s in wonder3d_reference_shapes(config).items()}
    assert any(".attn_joint_twice." in k for k in weights)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(weights, tmp_path / "diffusion_pytorch_model.bin")  # the released checkpoint format
    unet, report = load_wonder3d_unet(tmp_path, attention_backend="math")
    assert report.missing == [] and report.unexpected == []
    assert unet.config.cd_attention_mid and unet.config.num_views == 2
    state = unet.state_dict()
    for key, value in weights.items():
        assert torch.equal(state[rename_legacy_key(key)], value), key
    out = unet(*inputs(4, 8)).sample
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()


def test_wonder3d_strict_load_reports_missing(tmp_path: Path) -> None:
    config = wonder3d_config()
    shapes = wonder3d_reference_shapes(config)
    weights = {k: torch.zeros(s) for k, s in shapes.items() if "attn_joint_twice" not in k}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(weights, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="attn_joint_mid"):
        load_wonder3d_unet(tmp_path, verbose=False)


def test_legacy_key_renames() -> None:
    assert (
        rename_legacy_key("a.transformer_blocks.0.attn_joint.to_q.weight")
        == "a.transformer_blocks.0.attn_joint_last.to_q.weight"
    )
    assert rename_legacy_key("a.0.norm_joint_twice.bias") == "a.0.norm_joint_mid.bias"
    assert rename_legacy_key("a.0.attn_joint_mid.to_k.weight") == "a.0.attn_joint_mid.to_k.weight"


# ---------------------------------------------------------------- (c) save / load round trip


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = MVUNet.from_config(tiny_unet_config(num_views=2, cd_attention_last=True, sparse_mv_attention=True))
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)  # joint layers included (not at their zero init)
    unet.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_views"] == 2 and saved["sparse_mv_attention"] and saved["cd_attention_last"]
    loaded = MVUNet.from_pretrained(tmp_path)
    public = lambda cfg: json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}))  # noqa: E731
    assert public(loaded.config) == public(unet.config)
    x = inputs(4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(*x).sample, unet(*x).sample)


def test_stage2_from_stage1_folder_adds_zero_cross_domain_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stage1 = MVUNet.from_config(tiny_unet_config(num_views=2, cd_attention_mid=False))
    stage1.save_pretrained(tmp_path)
    stage2, report = load_unet(tmp_path, {"cd_attention_mid": True}, verbose=False)
    assert report.missing and all("_joint_mid." in k for k in report.missing) and report.unexpected == []
    joint = [p for n, p in stage2.named_parameters() if "attn_joint_mid.to_out" in n]
    assert joint and all(torch.count_nonzero(p) == 0 for p in joint)  # zero init, not uninitialised memory
    x = inputs(4, 8)  # one object, two views, both domains
    with torch.no_grad():  # zero-initialised joint layers: stage 2 starts exactly at stage 1
        torch.testing.assert_close(stage2(*x).sample, stage1(*x).sample, atol=1e-6, rtol=0)
    stage2.save_pretrained(tmp_path / "stage2")
    with pytest.raises(WeightsError, match="not allowed"):  # dropping trained layers is not silent
        load_unet(tmp_path / "stage2", {"cd_attention_mid": False}, verbose=False)
    with pytest.raises(WeightsError, match="do not fit"):
        load_unet(tmp_path, {"layers_per_block": 2}, verbose=False)
