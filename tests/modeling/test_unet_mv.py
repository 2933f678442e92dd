"""MVUNet: shapes, batch-layout checks, multi-view / cross-domain behaviour, backends, checkpointing, compile."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling.attention import AttentionBackendError, MultiViewAttnProcessor, xformers_available
from modeling.blocks import MVTransformerBlock
from modeling.layout import LayoutError, check_batch_size, split_domains, stack_domains
from modeling.unet_mv import MVUNet, normalize_config, tiny_unet_config
from tests.modeling.attention_reference import rowwise_loop_reference

VIEWS = 2


def make_unet(seed: int = 0, **overrides) -> MVUNet:
    torch.manual_seed(seed)
    return MVUNet.from_config(tiny_unet_config(num_views=VIEWS, **overrides))


def make_inputs(n: int, seed: int = 1, height: int = 8, width: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(n, 8, height, width, generator=g)
    timestep = torch.randint(0, 1000, (n,), generator=g)
    context = torch.randn(n, 1, 32, generator=g)
    camera = torch.randn(n, 10, generator=g)
    return sample, timestep, context, camera


def randomize_joint_layers(unet: MVUNet) -> None:
    """Give the zero-initialised cross-domain output projections non-zero weights."""
    torch.manual_seed(5)
    for name, p in unet.named_parameters():
        if "joint" in name and "to_out" in name:
            torch.nn.init.normal_(p, std=0.2)


def test_layout_stack_split_order() -> None:
    b, v = 2, 3
    normal = torch.arange(b * v).reshape(b, v, 1).float()
    color = 100 + normal
    stacked = stack_domains(normal, color)
    # (domain, object, view): normals of object 0 views 0..2, object 1, then colors
    assert stacked[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104, 105]
    n2, c2 = split_domains(stacked, b, v)
    assert torch.equal(n2, normal) and torch.equal(c2, color)
    with pytest.raises(LayoutError):
        split_domains(stacked, 3, v)
    with pytest.raises(LayoutError, match="2·num_views"):
        check_batch_size(6, 6, cross_domain=True)
    check_batch_size(6, 6, cross_domain=False)


def test_forward_backward_shapes_and_batch_check() -> None:
    unet = make_unet(cd_attention_last=True)
    sample, t, ctx, cam = make_inputs(2 * VIEWS)
    out = unet(sample, t, ctx, cam).sample
    assert out.shape == (2 * VIEWS, 4, 8, 8)
    out.square().mean().backward()
    assert unet.conv_in.weight.grad is not None and unet.class_embedding.linear_1.weight.grad is not None
    with pytest.raises(LayoutError, match="not a multiple of 2·num_views"):
        unet(*make_inputs(VIEWS))  # one domain only, but cross-domain attention is on


def test_multiview_attention_mixes_views_of_one_object_only() -> None:
    unet = make_unet(cd_attention_mid=False).eval()
    inputs = make_inputs(2 * VIEWS)  # two objects, one domain
    changed = inputs[0].clone()
    changed[VIEWS] += 1.0  # object 1, view 0
    with torch.no_grad():
        a = unet(inputs[0], *inputs[1:]).sample
        b = unet(changed, *inputs[1:]).sample
    assert torch.equal(a[:VIEWS], b[:VIEWS])  # object 0 unaffected
    assert (a[VIEWS + 1] - b[VIEWS + 1]).abs().max() > 1e-4  # other view of object 1 affected


@pytest.mark.parametrize("zero_init", [True, False])
def test_cross_domain_pairs_rows_across_halves(zero_init: bool) -> None:
    unet = make_unet(cd_attention_mid=True, cd_attention_last=True).eval()
    if not zero_init:
        randomize_joint_layers(unet)
    inputs = make_inputs(2 * VIEWS)  # one object: normals rows 0..V-1, colors rows V..2V-1
    changed = inputs[0].clone()
    changed[VIEWS:] += 1.0  # change the color half only
    with torch.no_grad():
        a = unet(inputs[0], *inputs[1:]).sample
        b = unet(changed, *inputs[1:]).sample
    normal_change = (a[:VIEWS] - b[:VIEWS]).abs().max().item()
    if zero_init:
        assert normal_change == 0.0  # zero-initialised joint layers: the domains do not interact yet
    else:
        assert normal_change > 1e-4


@pytest.mark.parametrize("mode", ["dense", "sparse", "rowwise"])
def test_sdpa_equals_math_whole_unet(mode: str) -> None:
    unet = make_unet(
        sparse_mv_attention=mode == "sparse", rowwise_mv_attention=mode == "rowwise", cd_attention_last=True
    )
    randomize_joint_layers(unet)
    inputs = make_inputs(2 * VIEWS)
    results = []
    for backend in ("math", "sdpa"):
        unet.set_attention(backend)
        unet.zero_grad()
        out = unet(*inputs).sample
        out.square().mean().backward()
        results.append((out.detach(), unet.conv_in.weight.grad.clone()))
    assert unet.config.attention_backend == "sdpa"
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_unavailable_backend_is_an_error() -> None:
    with pytest.raises(AttentionBackendError):
        make_unet(attention_backend="flash9")
    if not xformers_available():
        with pytest.raises(AttentionBackendError, match="xformers"):
            make_unet().set_attention("xformers")


@pytest.mark.parametrize("rowwise", [False, True])
def test_gradient_checkpointing_same_output_and_grads(rowwise: bool) -> None:
    unet = make_unet(cd_attention_last=True, rowwise_mv_attention=rowwise)
    randomize_joint_layers(unet)
    inputs = make_inputs(
        2 * VIEWS, height=8, width=6
    )  # non-square: the latent size must survive checkpointing
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.zero_grad()
        out = unet(*inputs).sample
        out.square().mean().backward()
        grads.append(
            (out.detach(), unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad)
        )
    assert unet.is_gradient_checkpointing
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("rowwise", [False, True])
def test_compiles_without_graph_breaks(rowwise: bool) -> None:
    """fullgraph=True fails on any graph break (attention path included); eager backend keeps this fast.

    Inductor compilation of the same model works too but takes ~70 s on 2 CPU cores, too slow for CI.
    """
    unet = make_unet(cd_attention_last=True, rowwise_mv_attention=rowwise, attention_backend="sdpa").eval()
    inputs = make_inputs(2 * VIEWS, height=8, width=6)
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs).sample, unet(*inputs).sample)


def test_every_transformer_block_is_multiview_and_wonder3d_names_map() -> None:
    unet = make_unet()
    blocks = [m for m in unet.modules() if isinstance(m, MVTransformerBlock)]
    assert len(blocks) == 4  # down 0 (1 layer), mid (1), up 1 (layers_per_block + 1 = 2)
    assert all(b.options.num_views == VIEWS and b.options.cd_attention_mid for b in blocks)
    cfg = normalize_config(
        {
            "down_block_types": ["CrossAttnDownBlockMV2D", "DownBlock2D"],
            "mid_block_type": "UNetMidBlockMV2DCrossAttn",
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlockMV2D"],
            "joint_attention_twice": True,
            "joint_attention": False,
        }
    )
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert (
        cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn"
        and cfg["up_block_types"][1] == "CrossAttnUpBlock2D"
    )
    assert cfg["cd_attention_mid"] is True and cfg["cd_attention_last"] is False
    assert "joint_attention_twice" not in cfg


def _wonder3d_style_attention(attn, x: torch.Tensor, mode: str, views: int) -> torch.Tensor:
    """Wonder3D's processors re-derived: per-row queries, keys/values gathered by repeating (materialised)."""
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    if mode == "mv":  # "(b t) d c -> b (t d) c", then repeated for each of the t views
        k = k.reshape(-1, views * k.shape[1], k.shape[2]).repeat_interleave(views, dim=0)
        v = v.reshape(-1, views * v.shape[1], v.shape[2]).repeat_interleave(views, dim=0)
    elif mode == "joint":  # halves chunked, concatenated on tokens, duplicated for both halves
        k = torch.cat(torch.chunk(k, 2), dim=1).repeat(2, 1, 1)
        v = torch.cat(torch.chunk(v, 2), dim=1).repeat(2, 1, 1)
    h = attn.heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
    out = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1) @ v
    return attn.to_out[0](out.transpose(1, 2).flatten(2))


def test_block_order_matches_wonder3d_reference() -> None:
    unet = make_unet(cd_attention_mid=True, cd_attention_last=True)
    randomize_joint_layers(unet)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    torch.manual_seed(2)
    x, ctx = torch.randn(2 * 2 * VIEWS, 16, 32), torch.randn(2 * 2 * VIEWS, 1, 32)  # 2 objects, 2 domains
    with torch.no_grad():
        ref = _wonder3d_style_attention(block.attn1, block.norm1(x), "mv", VIEWS) + x
        ref = _wonder3d_style_attention(block.attn_joint_mid, block.norm_joint_mid(ref), "joint", VIEWS) + ref
        # cross-attention over the single CLIP token: its weight is exactly 1, so the output is its value
        ref = block.attn2.to_out[0](block.attn2.to_v(ctx)).expand_as(ref) + ref
        ref = block.ff(block.norm3(ref)) + ref
        ref = (
            _wonder3d_style_attention(block.attn_joint_last, block.norm_joint_last(ref), "joint", VIEWS) + ref
        )
        ours = block(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# --- row-wise multi-view attention (Era3D), through MVUNet.from_config -------------------------------------


def attn1_layers(unet: MVUNet) -> list:
    return [m.attn1 for m in unet.modules() if isinstance(m, MVTransformerBlock)]


def test_rowwise_unet_differs_from_dense_with_the_same_weights() -> None:
    dense = make_unet(seed=3, cd_attention_mid=False, attention_backend="math").eval()
    rowwise = make_unet(
        seed=3, cd_attention_mid=False, rowwise_mv_attention=True, attention_backend="math"
    ).eval()
    dense_weights, rowwise_weights = dense.state_dict(), rowwise.state_dict()
    assert dense_weights.keys() == rowwise_weights.keys()
    assert all(torch.equal(dense_weights[k], rowwise_weights[k]) for k in dense_weights)  # same parameters
    inputs = make_inputs(2 * VIEWS)
    with torch.no_grad():
        diff = (dense(*inputs).sample - rowwise(*inputs).sample).abs().max().item()
    assert diff > 1e-2, f"row-wise UNet output equals dense (max |diff| {diff:.2e}): the flag is not wired"


@pytest.mark.parametrize(("latent", "level_1"), [((8, 8), (4, 4)), ((8, 4), (4, 2)), ((5, 7), (3, 4))])
def test_rowwise_attention_in_the_unet_equals_loop_reference(latent: tuple, level_1: tuple) -> None:
    """Each real attn1 call of a UNet forward (inputs captured by hooks) against the loop reference; the
    non-square latents need the real grid of every level (5x7 -> 3x4: diffusers' downsampler rounds up)."""
    unet = make_unet(cd_attention_mid=True, rowwise_mv_attention=True, attention_backend="math").eval()
    levels = {latent[0] * latent[1]: latent, level_1[0] * level_1[1]: level_1}  # tokens -> (h, w)
    calls: list[tuple] = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0], out)))
        for layer in attn1_layers(unet)
    ]
    assert all(isinstance(layer.processor, MultiViewAttnProcessor) for layer in attn1_layers(unet))
    try:
        with torch.no_grad():
            unet(*make_inputs(2 * 2 * VIEWS, height=latent[0], width=latent[1]))  # 2 objects, 2 domains
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 4 and {x.shape[1] for _, x, _ in calls} == set(levels)
    with torch.no_grad():
        for attn, x, out in calls:
            h, w = levels[x.shape[1]]
            ref = rowwise_loop_reference(attn, x, VIEWS, h, w)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class LargestAttentionTensor(TorchDispatchMode):
    """Largest tensor (in elements) any op creates while an attn1 layer runs (its peak memory, op by op)."""

    def __init__(self, layers: list) -> None:
        super().__init__()
        self.inside, self.largest = 0, 0
        for layer in layers:
            layer.register_forward_pre_hook(lambda *_: setattr(self, "inside", self.inside + 1))
            layer.register_forward_hook(lambda *_: setattr(self, "inside", self.inside - 1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


def largest_attention_tensor(views: int, side: int, rowwise: bool) -> int:
    torch.manual_seed(0)
    config = tiny_unet_config(
        num_views=views, cd_attention_mid=False, rowwise_mv_attention=rowwise, attention_backend="math"
    )
    unet = MVUNet.from_config(config).eval()
    mode = LargestAttentionTensor(attn1_layers(unet))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), mode:
        unet(
            torch.randn(views, 8, side, side, generator=g),
            torch.zeros(views),
            torch.randn(views, 1, 32),
            torch.randn(views, 10),
        )
    return mode.largest


def test_rowwise_attention_memory_grows_with_views_times_width() -> None:
    """Scores per attention call: (h·heads)·(V·w)² for row-wise (one object), not heads·(V·h·w)² as dense.

    The math backend materialises the scores, so the largest tensor in attn1 is the score tensor; at the
    first level (side², 32 channels, 4 heads) it dominates q/k/v ((V·side², 32)) for these sizes.
    """
    heads = 4
    for views, side in ((2, 16), (2, 32), (4, 16)):
        largest = largest_attention_tensor(views, side, rowwise=True)
        assert largest == side * heads * (views * side) ** 2, (views, side, largest)
    dense = largest_attention_tensor(2, 16, rowwise=False)
    assert dense == heads * (2 * 16 * 16) ** 2  # the (views × H × W)² that row-wise avoids
