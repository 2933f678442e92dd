"""Loop references for grouped attention, written independently of modeling/attention.py's regrouping."""

import torch


def rowwise_loop_reference(attn, x: torch.Tensor, views: int, height: int, width: int) -> torch.Tensor:
    """Row r of view v attends to row r of every view of its object: explicit loops, plain softmax maths."""
    heads = attn.heads
    out = torch.empty(x.shape[0], height * width, attn.to_out[0].out_features)
    for first in range(0, x.shape[0], views):  # one object (of one domain)
        for r in range(height):
            cols = slice(r * width, (r + 1) * width)
            seq = torch.cat([x[first + v, cols] for v in range(views)])[None]  # (1, V·w, C)
            q, k, v = (
                t.reshape(1, t.shape[1], heads, -1).transpose(1, 2)
                for t in (attn.to_q(seq), attn.to_k(seq), attn.to_v(seq))
            )
            o = ((q @ k.transpose(-1, -2) * attn.scale).softmax(-1) @ v).transpose(1, 2).flatten(2)
            o = attn.to_out[0](o)[0]  # (V·w, C)
            for view in range(views):
                out[first + view, cols] = o[view * width : (view + 1) * width]
    return out
