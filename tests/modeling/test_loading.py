"""Loading: (a) from a 2D UNet folder, (b) from a Wonder3D checkpoint folder, (c) our own round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from modeling.convert_2d import load_from_2d_unet
from modeling.unet_loading import WeightsError, load_unet_folder
from modeling.unet_mv import MVUNet, tiny_unet_config
from modeling.wonder3d_keys import rename_legacy_key
from tests.modeling.wonder3d_checkpoint import CTX, TINY_2D, reference_unet, write_wonder3d_unet


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


def test_wonder3d_checkpoint_loads_through_from_pretrained(tmp_path: Path) -> None:
    weights = write_wonder3d_unet(tmp_path)
    unet = MVUNet.from_pretrained(tmp_path, attention_backend="math")
    assert unet.config.cd_attention_mid and unet.config.num_views == 2 and not unet.training
    assert unet.config.attention_backend == "math"  # an override
    state = unet.state_dict()
    assert state.keys() == {rename_legacy_key(k) for k in weights}
    for key, value in weights.items():
        assert torch.equal(state[rename_legacy_key(key)], value), key
    x = inputs(4, 8)
    with torch.no_grad():
        out, expected = unet(*x).sample, reference_unet(weights, attention_backend="math")(*x).sample
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_wonder3d_checkpoint_with_a_bad_key_is_refused(tmp_path: Path, change: str) -> None:
    weights = write_wonder3d_unet(tmp_path)
    if change == "missing":
        key = next(k for k in weights if "attn_joint_twice" in k)
        del weights[key]
        named = rename_legacy_key(key)  # the error names the key the model lacks, in its current name
    else:
        key = named = "down_blocks.0.attentions.0.extra_layer.weight"
        weights[key] = torch.zeros(3)
    torch.save(weights, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=rf"{tmp_path}.*1 {change} keys \['{re.escape(named)}'\]"):
        MVUNet.from_pretrained(tmp_path)


class _Payload:
    """Unpickled without weights_only, this would write ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def test_a_pickled_payload_in_a_bin_is_a_weights_error(tmp_path: Path) -> None:
    weights = write_wonder3d_unet(tmp_path)
    marker = tmp_path / "marker"
    torch.save({**weights, "payload": _Payload(marker)}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bin: refused to load"):
        MVUNet.from_pretrained(tmp_path)
    assert not marker.exists()


def test_unknown_override_key_is_refused(tmp_path: Path) -> None:
    write_wonder3d_unet(tmp_path)
    with pytest.raises(WeightsError, match="low_cpu_mem_usage"):
        MVUNet.from_pretrained(tmp_path, low_cpu_mem_usage=False)


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
    stage2, report = load_unet_folder(MVUNet, tmp_path, {"cd_attention_mid": True})
    assert report.missing and all("_joint_mid." in k for k in report.missing) and report.unexpected == []
    joint = [p for n, p in stage2.named_parameters() if "attn_joint_mid.to_out" in n]
    assert joint and all(torch.count_nonzero(p) == 0 for p in joint)  # zero init, not uninitialised memory
    x = inputs(4, 8)  # one object, two views, both domains
    with torch.no_grad():  # zero-initialised joint layers: stage 2 starts exactly at stage 1
        torch.testing.assert_close(stage2(*x).sample, stage1(*x).sample, atol=1e-6, rtol=0)
    stage2.save_pretrained(tmp_path / "stage2")
    with pytest.raises(WeightsError, match="unexpected keys"):  # dropping trained layers is not silent
        MVUNet.from_pretrained(tmp_path / "stage2", cd_attention_mid=False)
    with pytest.raises(WeightsError, match="do not fit"):
        MVUNet.from_pretrained(tmp_path, layers_per_block=2)
