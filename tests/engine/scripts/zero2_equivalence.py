"""Train a few steps on one fixed global batch of 4 objects and save the final weights (run under torchrun).

python -m torch.distributed.run --nproc_per_node 2 tests/engine/scripts/zero2_equivalence.py OUT.safetensors
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from safetensors.torch import save_file

from engine.distributed import init_distributed
from tests.engine.fixed_batch import fixed_batch_run, global_batch, tiny_config, train_steps

GLOBAL_OBJECTS = 4

if __name__ == "__main__":
    info = init_distributed()
    micro = GLOBAL_OBJECTS // info.world_size
    cfg = tiny_config(f"train.micro_batch_size={micro}", "train.warmup_steps=0", "train.ema_decay=0")
    run = fixed_batch_run(cfg, info)
    losses = train_steps(run, global_batch(GLOBAL_OBJECTS), steps=3)
    if info.is_main:
        state = {k: v.detach().float().contiguous() for k, v in run.engine.module.state_dict().items()}
        save_file(state, sys.argv[1], metadata={"losses": ",".join(map(repr, losses))})
