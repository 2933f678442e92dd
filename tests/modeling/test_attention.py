"""Attention backends and groupings: semantics against loop references, and backend equivalence."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from modeling import attention as att
from modeling.attention import (
    AttentionBackendError,
    AttnProcessor,
    CrossDomainAttnProcessor,
    MultiViewAttnProcessor,
    check_backend,
    resolve_backend,
)
from tests.modeling.attention_reference import rowwise_loop_reference

DIM, HEADS, TOKENS, VIEWS, OBJECTS = 32, 4, 9, 3, 2  # 9 tokens = a 3x3 grid (square: no latent size needed)


def make_attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    layer = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS)
    torch.nn.init.normal_(layer.to_out[0].bias)  # non-trivial output bias
    return layer


def rows(n_rows: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n_rows, TOKENS, DIM)


def per_row_reference(layer: Attention, x: torch.Tensor, context_rows) -> torch.Tensor:
    """Loop reference: row i's queries attend to cat([x[j] for j in context_rows(i)]) with plain math."""
    outs = []
    for i in range(x.shape[0]):
        ctx = torch.cat([x[j] for j in context_rows(i)], dim=0)[None]
        q, k, v = layer.to_q(x[i : i + 1]), layer.to_k(ctx), layer.to_v(ctx)
        q, k, v = (t.reshape(1, t.shape[1], HEADS, -1).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) * layer.scale).softmax(-1)
        o = (w @ v).transpose(1, 2).reshape(1, TOKENS, DIM)
        outs.append(layer.to_out[0](o))
    return torch.cat(outs)


def dense_views(i: int) -> list[int]:
    start = i // VIEWS * VIEWS
    return list(range(start, start + VIEWS))


def sparse_views(i: int) -> list[int]:
    return [i // VIEWS * VIEWS, i]


@pytest.mark.parametrize(("grid", "latent_size"), [((3, 3), None), ((2, 3), (4, 5)), ((3, 2), (3, 2))])
def test_rowwise_processor_matches_loop_reference(grid: tuple[int, int], latent_size) -> None:
    """The processor alone (the UNet's real processors are checked in test_unet_mv.py): a square grid is
    inferred; a non-square one comes from the latent size (4x5 -> level 2x3)."""
    layer = make_attention()
    torch.manual_seed(1)
    x = torch.randn(OBJECTS * VIEWS, grid[0] * grid[1], DIM)
    layer.set_processor(MultiViewAttnProcessor(VIEWS, backend="math", rowwise=True))
    kwargs = {} if latent_size is None else {"latent_size": latent_size}
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x, **kwargs), rowwise_loop_reference(layer, x, VIEWS, *grid), atol=1e-5, rtol=1e-5
        )


def test_token_grid_follows_the_unet_levels_and_refuses_what_it_cannot_tell() -> None:
    assert att.token_grid(9, None) == (3, 3)
    assert att.token_grid(5 * 7, (5, 7)) == (5, 7)
    assert att.token_grid(3 * 4, (5, 7)) == (3, 4)  # stride-2 downsamplers round up: 5x7 -> 3x4 -> 2x2
    assert att.token_grid(1, (5, 7)) == (1, 1)
    with pytest.raises(ValueError, match=r"12 tokens .*not a square.*latent_size"):
        att.token_grid(12, None)
    with pytest.raises(ValueError, match="10 tokens per image is no UNet level of a 5x7 latent"):
        att.token_grid(10, (5, 7))
    layer = make_attention()
    layer.set_processor(MultiViewAttnProcessor(VIEWS, backend="math", rowwise=True))
    with pytest.raises(ValueError, match="not a square"):
        layer(torch.randn(VIEWS, 12, DIM))


def cross_domain(i: int, half: int) -> list[int]:
    j = i % half
    return [j, j + half]


CASES = {
    "plain": (lambda: AttnProcessor("math"), OBJECTS * VIEWS, lambda n: lambda i: [i]),
    "multiview": (
        lambda: MultiViewAttnProcessor(VIEWS, False, "math"),
        OBJECTS * VIEWS,
        lambda n: dense_views,
    ),
    "sparse": (lambda: MultiViewAttnProcessor(VIEWS, True, "math"), OBJECTS * VIEWS, lambda n: sparse_views),
    "rowwise": (
        lambda: MultiViewAttnProcessor(VIEWS, False, "math", rowwise=True),
        OBJECTS * VIEWS,
        None,  # checked against its own loop reference below
    ),
    "cross_domain": (
        lambda: CrossDomainAttnProcessor("math"),
        2 * OBJECTS * VIEWS,
        lambda n: lambda i: cross_domain(i, n // 2),
    ),
}


@pytest.mark.parametrize("case", ["plain", "multiview", "sparse", "cross_domain"])
def test_grouping_matches_loop_reference(case: str) -> None:
    make_proc, n_rows, context = CASES[case]
    layer = make_attention()
    x = rows(n_rows)
    layer.set_processor(make_proc())
    with torch.no_grad():
        ours = layer(x)
        ref = per_row_reference(layer, x, context(n_rows))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_multiview_groups_do_not_leak_between_objects() -> None:
    layer = make_attention()
    layer.set_processor(MultiViewAttnProcessor(VIEWS, backend="sdpa"))
    x = rows(OBJECTS * VIEWS)
    y = x.clone()
    y[VIEWS + 1] += 1.0  # change one view of object 1
    with torch.no_grad():
        a, b = layer(x), layer(y)
    assert torch.equal(a[:VIEWS], b[:VIEWS])  # object 0 untouched
    assert (a[VIEWS] - b[VIEWS]).abs().max() > 1e-3  # another view of object 1 sees the change


def _run(layer: Attention, proc, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer.set_processor(proc)
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


def _available_backends() -> list:
    backends: list = ["sdpa", "auto"]
    xformers = pytest.mark.skipif(
        not (att.xformers_available() and torch.cuda.is_available()), reason="xformers + CUDA needed"
    )
    backends.append(pytest.param("xformers", marks=[pytest.mark.gpu, xformers]))
    return backends


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize("case", ["multiview", "sparse", "rowwise", "cross_domain", "plain"])
def test_backend_equals_math_forward_and_backward(case: str, backend: str) -> None:
    device = "cuda" if backend == "xformers" else "cpu"
    n_rows = CASES[case][1]
    layer = make_attention().to(device)
    x = rows(n_rows).to(device)

    def proc(name: str):
        if case == "multiview":
            return MultiViewAttnProcessor(VIEWS, False, name)
        if case in ("sparse", "rowwise"):
            return MultiViewAttnProcessor(VIEWS, case == "sparse", name, rowwise=case == "rowwise")
        return CrossDomainAttnProcessor(name) if case == "cross_domain" else AttnProcessor(name)

    ref_out, ref_grads = _run(layer, proc("math"), x)
    out, grads = _run(layer, proc(backend), x)
    err = (out - ref_out).abs().max().item()
    grad_err = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
    print(f"{case}/{backend}: max |Δout| = {err:.2e}, max |Δgrad| = {grad_err:.2e}")
    assert err < 1e-5 and grad_err < 1e-5


def test_backend_errors() -> None:
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        check_backend("flash9")
    with pytest.raises(AttentionBackendError, match="CUDA"):
        resolve_backend("xformers", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    if not att.xformers_available():
        with pytest.raises(AttentionBackendError, match="not installed"):
            MultiViewAttnProcessor(VIEWS, backend="xformers")


def test_group_helpers_round_trip_without_copies() -> None:
    x = rows(2 * OBJECTS * VIEWS)
    grouped = att.group_views(x, VIEWS)
    assert grouped.shape == (2 * OBJECTS, VIEWS * TOKENS, DIM)
    assert grouped.data_ptr() == x.data_ptr()  # a view: no repeated keys/values
    assert torch.equal(att.ungroup_views(grouped, VIEWS), x)
    joined = att.group_domains(x)
    assert joined.shape == (OBJECTS * VIEWS, 2 * TOKENS, DIM)
    assert torch.equal(joined[1, :TOKENS], x[1]) and torch.equal(joined[1, TOKENS:], x[1 + OBJECTS * VIEWS])
    assert torch.equal(att.ungroup_domains(joined), x)
    by_rows = att.group_view_rows(x, VIEWS, height=3)  # 9 tokens = 3 rows of 3
    assert by_rows.shape == (2 * OBJECTS * 3, VIEWS * 3, DIM)
    assert torch.equal(by_rows[1, 3:6], x[1, 3:6])  # object 0, row 1: view 1's row 1 follows view 0's
    assert torch.equal(att.ungroup_view_rows(by_rows, VIEWS, height=3), x)


@pytest.mark.slow
def test_inductor_compiles_multiview_attention_layer() -> None:
    """Real (inductor) compilation of one multi-view attention layer, fullgraph: ~10 s on 2 CPU cores.

    The whole tiny UNet is checked for graph breaks in tests/modeling/test_unet_mv.py (eager backend).
    """
    layer = make_attention()
    layer.set_processor(MultiViewAttnProcessor(VIEWS, backend="sdpa"))
    x = rows(OBJECTS * VIEWS)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
