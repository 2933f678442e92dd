"""No step waits for the device but once: losses stay device tensors until the logging interval.

``torch.cuda.set_sync_debug_mode`` exists only on CUDA; on the CPU we count the calls that would make the host
wait for a device (``.item()``, ``.tolist()``, ``bool()``/``float()`` of a tensor, ``.cpu()``, ``.numpy()``,
a boolean-mask select) made by the step's code: the loop, the loss and its logging sums. ``prepare``'s draws
are left out: they read CPU tensors of the per-object generators (host data on any device).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

import engine.train as train_module
from engine.distributed import init_distributed
from engine.train import loop, run_step
from tests.engine.fixed_batch import fixed_batch_run, global_batch, tiny_config

ENGINE = Path(train_module.__file__).resolve().parent
STEP_CODE = {  # file -> the functions counted there (None: all)
    str(ENGINE / "train.py"): None,
    str(ENGINE / "tracking.py"): None,
    str(ENGINE / "divergence.py"): None,
    str(ENGINE / "objective.py"): {"loss", "domain_sums", "domain_means"},
}
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class HostReads:
    """Counts host reads of tensors made by ``STEP_CODE`` while ``on``."""

    def __init__(self, monkeypatch):
        self.on, self.count = True, 0
        for name in READS:
            self._wrap(monkeypatch, name, lambda *args: True)
        self._wrap(monkeypatch, "__getitem__", _is_mask_select)

    def _wrap(self, monkeypatch, name: str, counts) -> None:
        original = getattr(torch.Tensor, name)

        def wrapper(tensor, *args, **kwargs):
            if self.on and counts(*args) and _in_step_code(sys._getframe(1).f_code):
                self.count += 1
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)


def _in_step_code(code) -> bool:
    if code.co_filename not in STEP_CODE:
        return False
    functions = STEP_CODE[code.co_filename]
    return functions is None or code.co_name in functions


def _is_mask_select(index=None, *_) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


class FixedLoader:
    """The loader interface the loop uses, handing out one fixed batch forever."""

    samples = bad_samples = bad_shards = fillers = 0

    def __init__(self, batch: dict):
        self.batch, self.skipped = batch, []

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}


@pytest.fixture(scope="module")
def info():
    return init_distributed()


def test_run_step_reads_the_device_once_per_step_not_per_micro_step(info, monkeypatch):
    cfg = tiny_config("train.micro_batch_size=1", "train.grad_accum=3")
    run = fixed_batch_run(cfg, info)
    batch = global_batch(1)
    run_step(run, iter([batch] * 3), 0)  # warm-up: first-step work (lazy state) is not what we count
    reads = HostReads(monkeypatch)
    totals = run_step(run, iter([batch] * 3), 1)
    assert reads.count <= 1, (
        f"{reads.count} host reads in one step of 3 micro-steps (at most 1: the bad-loss flag)"
    )
    assert all(isinstance(totals[k], torch.Tensor) for k in ("loss", "loss_normal_sum")), "sums stay tensors"


def test_logged_metrics_are_the_interval_means_read_only_when_logged(info, monkeypatch, tmp_path):
    cfg = tiny_config(
        f"run.dir={tmp_path}", "run.max_steps=4", "logging.every=2", "checkpoint.every=4", "validation.every=0",
        "logging.tensorboard=false", "logging.wandb_mode=disabled", "train.micro_batch_size=1",
        "train.grad_accum=2", "train.ema_decay=0",
    )  # fmt: skip
    run = fixed_batch_run(cfg, info)
    run.loader, run.validate = FixedLoader(global_batch(1)), False
    per_step, reads_at_start = [], []
    reads = HostReads(monkeypatch)

    def recorded_step(run, batches, step):
        reads_at_start.append(reads.count)
        totals = run_step(run, batches, step)
        reads.on = False  # this test's own reads are not counted
        per_step.append({k: float(v) for k, v in totals.items()})
        reads.on = True
        return totals

    monkeypatch.setattr(train_module, "run_step", recorded_step)
    loop(run)
    reads_at_start.append(reads.count)
    for step in (1, 3):  # steps that do not log: only run_step's one flag read
        used = reads_at_start[step] - reads_at_start[step - 1]
        assert used <= 1, f"step {step} (not logged) made {used} host reads in the train loop"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for record, pair in zip(logged, (per_step[0:2], per_step[2:4])):
        assert record["loss"] == pytest.approx(sum(p["loss"] for p in pair) / 2, rel=1e-6)
        for domain in ("normal", "color"):
            total = sum(p[f"loss_{domain}_sum"] for p in pair)
            images = sum(p[f"loss_{domain}_images"] for p in pair)
            assert record[f"loss_{domain}"] == pytest.approx(total / images, rel=1e-6)
    assert len({r["loss"] for r in logged}) == 2, "the two intervals trained on different noise"
