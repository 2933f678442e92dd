"""``launcher/train.py`` with one NaN forced into a real tensor of the run, for the divergence fault tests.

    python -m tests.faults.nan_injection <launcher/train.py arguments>        (torchrun: ``-m tests.faults...``)

``GNN3D_INJECT_NAN`` says where (the production code has no such hook; this module patches ``run_step``):
    batch:<step>[:<rank>]   a NaN in the diffusion noise of the first try of step <step> (on <rank> only, or on
                            every rank): its loss and gradient are NaN for real, through forward and backward
    weights:<step>          after step <step>'s optimizer update, a NaN in one UNet weight on every rank
"""

import os
import sys

import torch

import engine.train as training
from launcher.train import main


def _inject(kind: str, at_step: int, rank: int | None):
    original = training.run_step
    done = False

    def run_step(run, batches, step):
        nonlocal done
        if kind == "batch" and step + 1 == at_step and not done:
            done = True
            if rank is None or run.info.rank == rank:
                prepare = run.objective.prepare

                def poisoned(batch, generators):
                    inputs = prepare(batch, generators)
                    inputs.noise.view(-1)[0] = float("nan")
                    return inputs

                run.objective.prepare = poisoned  # this try of this step only
                try:
                    return original(run, batches, step)
                finally:
                    del run.objective.prepare
        totals = original(run, batches, step)
        if kind == "weights" and step + 1 == at_step and totals is not None:
            with torch.no_grad():
                next(run.engine.module.parameters()).view(-1)[0] = float("nan")
        return totals

    training.run_step = run_step


if __name__ == "__main__":
    kind, step, *rank = os.environ["GNN3D_INJECT_NAN"].split(":")
    _inject(kind, int(step), int(rank[0]) if rank else None)
    sys.exit(main())
