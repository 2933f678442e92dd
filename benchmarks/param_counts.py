"""Parameter counts of the full-scale Wonder3D recipes and a ZeRO model-state memory estimate per GPU.

    python benchmarks/param_counts.py            # writes benchmarks/results/param_counts.json (--quick: same)

The UNet is built on the meta device (no memory). Memory is an ESTIMATE of model states only (weights,
gradients, AdamW states, our fp32 EMA), from the ZeRO paper's accounting, not a measurement; activations
come on top and depend on batch size and gradient checkpointing.
"""

from pathlib import Path

import torch
from common import main_args, write_result

from engine.build import multiview_options
from engine.config import load_config
from engine.optim import select_trainable
from modeling.unet_mv import MVUNet

REPO = Path(__file__).resolve().parents[1]
# SD-1.x / sd-image-variations UNet widths (the 2D config that stage 1 starts from).
SD_UNET = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": 10,
}
GiB = 1024**3


def zero2_model_states_gib(total: int, trainable: int, gpus: int, bf16: bool = True) -> float:
    """Weights (bf16 or fp32) + ZeRO-2 partitioned grads, fp32 master/m/v and fp32 EMA (each rank its slice)."""
    weight_bytes = 2 if bf16 else 4
    weights = weight_bytes * total
    grads = weight_bytes * trainable / gpus
    optimizer = (12 if bf16 else 8) * trainable / gpus
    ema = 4 * trainable / gpus  # engine/ema.py keeps the EMA of the rank's own fp32 master partition
    return (weights + grads + optimizer + ema) / GiB


def stage_report(config_name: str) -> dict:
    cfg = load_config(REPO / "configs" / config_name, ["model.pretrained=", "model.unet="])
    with torch.device("meta"):
        unet = MVUNet.from_config({**SD_UNET, **multiview_options(cfg)})
    summary = select_trainable(unet, cfg.train.trainable)
    trainable = sum(t for t, _ in summary.values())
    total = trainable + sum(f for _, f in summary.values())
    return {
        "config": config_name,
        "parameters_total": total,
        "parameters_trainable": trainable,
        "trainable_patterns": cfg.train.trainable,
        "estimated_model_states_gib_per_gpu": {
            str(g): round(zero2_model_states_gib(total, trainable, g), 2) for g in (1, 2, 4, 8, 16)
        },
    }


GPUS = 8
GPU_GIB = 80  # an A100/H100 80 GB


def run(quick: bool) -> dict:
    """Counts on the meta device (instant; ``quick`` changes nothing). Ratio: stage-1 model states per GPU
    on 1 GPU over on 8 (what ZeRO-2 partitioning saves); goal: they fit an 80 GB GPU at 8 GPUs."""
    stages = [stage_report("wonder3d-stage1.yaml"), stage_report("wonder3d-stage2.yaml")]
    per_gpu = stages[0]["estimated_model_states_gib_per_gpu"]
    fits = all(s["estimated_model_states_gib_per_gpu"][str(GPUS)] <= GPU_GIB for s in stages)
    return {
        "config": {"configs": [s["config"] for s in stages], "unet": SD_UNET, "bf16": True},
        "raw": {
            "note": "estimate of model states only (bf16 weights, ZeRO-2 partitions incl. the partitioned "
            "fp32 EMA); not measured",
            "stages": stages,
        },
        "ratio": round(per_gpu["1"] / per_gpu[str(GPUS)], 3),
        "goal": f"model states <= {GPU_GIB} GiB per GPU at {GPUS} GPUs (estimate)",
        "met": fits,
        "baseline": f"stage-1 model states on 1 GPU vs {GPUS} GPUs (ZeRO-2 estimate, not measured)",
        "summary": (
            f"Stage 1 trains {stages[0]['parameters_trainable'] / 1e6:.0f} M parameters: ~{per_gpu['1']:.1f} GiB "
            f"of model states on 1 GPU, ~{per_gpu[str(GPUS)]:.1f} GiB per GPU on {GPUS} (ZeRO-2); stage 2 "
            f"trains {stages[1]['parameters_trainable'] / 1e6:.0f} M of "
            f"{stages[1]['parameters_total'] / 1e6:.0f} M."
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    args = main_args(__doc__.split("\n\n")[0], argv)
    result = run(args.quick)
    print(result["summary"])
    print(f"wrote {write_result('param_counts', result)}")
    return result


if __name__ == "__main__":
    main()
