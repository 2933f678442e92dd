"""Train a few bf16 steps on one fixed global batch of 4 objects with an EMA; save what the EMA test compares.

python -m torch.distributed.run --nproc_per_node 2 tests/engine/scripts/ema_partition.py OUT_DIR

Writes (rank 0) OUT_DIR/ema.safetensors (the EMA as a checkpoint saves it), OUT_DIR/masters.safetensors (the
full fp32 master after each step, key ``step<k>/<name>``) and OUT_DIR/local_numel.txt (EMA elements per rank).
Every rank also reloads the saved EMA and checks it gets its own slice back, bit for bit.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import save_file

from engine.distributed import init_distributed
from engine.ema import EMA
from tests.engine.fixed_batch import fixed_batch_run, global_batch, tiny_config, train_steps

GLOBAL_OBJECTS, STEPS, DECAY = 4, 3, 0.5

if __name__ == "__main__":
    out = Path(sys.argv[1])
    info = init_distributed()
    micro = GLOBAL_OBJECTS // info.world_size
    cfg = tiny_config(
        f"train.micro_batch_size={micro}", "train.warmup_steps=0", "train.lr=1e-3", "train.precision=bf16",
        f"train.ema_decay={DECAY}",
    )  # fmt: skip
    run = fixed_batch_run(cfg, info)
    params = {n: p for n, p in run.engine.module.named_parameters() if p.requires_grad}
    masters = {}
    for step in range(STEPS + 1):
        if step:
            train_steps(run, global_batch(GLOBAL_OBJECTS), steps=1)
        for name, param in params.items():  # collective: every rank calls it
            masters[f"step{step}/{name}"] = safe_get_full_fp32_param(param).cpu().contiguous()
    run.ema.save(str(out / "ema.safetensors"))
    sizes = [None] * info.world_size
    dist.all_gather_object(sizes, run.ema.local_numel())
    dist.barrier()  # rank 0 has written the file
    reloaded = EMA(run.engine, DECAY)
    reloaded.load(str(out / "ema.safetensors"))
    assert reloaded.updates == run.ema.updates == STEPS
    assert reloaded.shadow.keys() == run.ema.shadow.keys()
    assert all(torch.equal(reloaded.shadow[n], run.ema.shadow[n]) for n in run.ema.shadow), "reload differs"
    if info.is_main:
        save_file(masters, str(out / "masters.safetensors"))
        (out / "local_numel.txt").write_text(" ".join(map(str, sizes)))
