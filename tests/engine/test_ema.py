"""EMA: warm-start decay and update timing, fed from DeepSpeed's fp32 master, partitioned like ZeRO-2's optimizer."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param
from safetensors import safe_open
from safetensors.torch import load_file

from engine.distributed import free_port, init_distributed
from engine.ema import EMA, warm_decay
from tests.engine.fixed_batch import fixed_batch_run, global_batch, tiny_config, train_steps
from tests.engine.runs import REPO, env, train


def test_warm_start_decay_and_every_n_timing():
    module = torch.nn.Linear(2, 1)
    ema = EMA(SimpleNamespace(module=module, optimizer=None), decay=0.9, every=3)
    expected = {n: p.detach().clone() for n, p in module.named_parameters()}
    decays = []
    with torch.no_grad():
        for step in range(1, 10):
            for p in module.parameters():
                p.add_(1.0)  # an optimizer step
            ema.update(step)
            if step % 3 == 0:
                decay = min(0.9, (1 + len(decays) + 1) / (10 + len(decays) + 1))
                decays.append(decay)
                for n, p in module.named_parameters():
                    expected[n] = decay * expected[n] + (1 - decay) * p
            for n, p in module.named_parameters():
                torch.testing.assert_close(ema.shadow[n].view(p.shape), expected[n], rtol=0, atol=1e-6)
    assert ema.updates == 3, "updates only after optimizer steps 3, 6, 9"
    assert decays == pytest.approx([2 / 11, 3 / 12, 4 / 13])
    assert [warm_decay(0.9, n) for n in (1, 80, 10_000)] == pytest.approx([2 / 11, 81 / 90, 0.9])


def test_disabled_ema_keeps_no_copy_and_never_updates():
    module = torch.nn.Linear(2, 1)
    ema = EMA(SimpleNamespace(module=module, optimizer=None), decay=0.0)
    ema.update(1)
    assert not ema.enabled and ema.shadow == {} and ema.updates == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision,ds_name", [("bf16", "zero2.json"), ("bf16", "zero1.json"), ("fp32", "zero2.json")]
)
def test_ema_averages_the_fp32_master_weights(precision, ds_name):
    info = init_distributed()
    cfg = tiny_config(
        f"train.precision={precision}", "train.micro_batch_size=1", "train.warmup_steps=0",
        "train.lr=1e-3", "train.ema_decay=0.5",
    )  # fmt: skip
    run = fixed_batch_run(cfg, info, ds_name)
    params = {n: p for n, p in run.engine.module.named_parameters() if p.requires_grad}

    def master() -> dict:  # DeepSpeed's own reader of its fp32 master copy
        return {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}

    def module() -> dict:
        return {n: p.detach().float().clone() for n, p in params.items()}

    ema_master, ema_module = master(), module()
    for step in range(1, 4):
        train_steps(run, global_batch(1), steps=1)
        decay = warm_decay(0.5, step)
        now_master, now_module = master(), module()
        for n in params:
            ema_master[n] = decay * ema_master[n] + (1 - decay) * now_master[n]
            ema_module[n] = decay * ema_module[n] + (1 - decay) * now_module[n]
    got = run.ema.gather()
    worst = max((got[n] - ema_master[n]).abs().max().item() for n in params)
    off_bf16 = max((got[n] - ema_module[n]).abs().max().item() for n in params)
    print(
        f"{precision} {ds_name}: |EMA - fp32 hand EMA| {worst:.2e}, |EMA - module-weight EMA| {off_bf16:.2e}"
    )
    # Observed 1.2e-7: one float32 ulp at 1.0 (norm weights), d·a + (1-d)·w against torch.lerp. Bound: 2 ulps.
    assert worst <= 2.5e-7, f"EMA is not the EMA of the fp32 master: off by {worst}"
    if precision == "bf16":  # bf16 rounding of weights ~0.1 is ~4e-4: far above the tolerance above
        assert off_bf16 > 1e-5, "EMA equals the EMA of the bf16 module weights"
    assert run.ema.local_numel() == sum(p.numel() for p in params.values())


def _partitioned_run(nproc: int, out) -> tuple[dict, dict, list[int]]:
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={29720 + nproc}", str(REPO / "tests" / "engine" / "scripts" / "ema_partition.py")]
    proc = subprocess.run([*cmd, str(out)], env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sizes = [int(x) for x in (out / "local_numel.txt").read_text().split()]
    return load_file(str(out / "ema.safetensors")), load_file(str(out / "masters.safetensors")), sizes


def _hand_ema(masters: dict, names, steps: int, decay: float) -> dict:
    ema = {n: masters[f"step0/{n}"].clone() for n in names}
    for step in range(1, steps + 1):
        d = warm_decay(decay, step)
        ema = {n: d * ema[n] + (1 - d) * masters[f"step{step}/{n}"] for n in names}
    return ema


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_each_hold_half_of_the_ema_and_save_the_one_rank_ema(tmp_path):
    one, masters_one, sizes_one = _partitioned_run(1, tmp_path / "one")
    two, masters_two, sizes_two = _partitioned_run(2, tmp_path / "two")
    total = sum(t.numel() for t in one.values())
    assert sizes_one == [total] and sum(sizes_two) == total, (sizes_one, sizes_two, total)
    # ZeRO splits the flat parameter group evenly; only the alignment padding of the last rank differs.
    assert all(abs(size - total / 2) < 0.001 * total for size in sizes_two), sizes_two
    assert one.keys() == two.keys()
    # Each run's saved EMA is the EMA of its own fp32 master (gathered slices land in the right places).
    for saved, masters in ((one, masters_one), (two, masters_two)):
        hand = _hand_ema(masters, saved, steps=3, decay=0.5)
        worst = max((saved[n] - hand[n]).abs().max().item() for n in saved)
        assert worst <= 2.5e-7, f"saved EMA is off the hand EMA of the master by {worst}"
    # An EMA is a convex combination of the masters of its steps, so the 1-vs-2-rank EMA difference is at most
    # the largest master difference over those steps (which comes from summation order; see test_training).
    bound = max((masters_one[k] - masters_two[k]).abs().max().item() for k in masters_one)
    worst = max((one[n] - two[n]).abs().max().item() for n in one)
    print(f"EMA per rank {sizes_two} of {total}; 1-vs-2-rank EMA diff {worst:.2e}, master diff {bound:.2e}")
    assert bound > 0 and worst <= bound + 2.5e-7, f"EMA differs by {worst}, masters by at most {bound}"


@pytest.mark.slow
@pytest.mark.multiproc
def test_resumed_two_rank_run_ends_with_the_same_ema_bit_for_bit(tmp_path, demo_cache):
    steps = ["checkpoint.every=2", "train.ema_decay=0.9", "train.precision=bf16"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, demo_cache, *steps, "run.max_steps=4", nproc=2, port=free_port())
    train(resumed, demo_cache, *steps, "run.max_steps=2", nproc=2, port=free_port())
    train(resumed, demo_cache, *steps, "run.max_steps=4", nproc=2, port=free_port())  # resumes at step 2
    final = "checkpoints/step00000004/ema.safetensors"
    expected, got = load_file(str(straight / final)), load_file(str(resumed / final))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the resumed EMA differs"
    with safe_open(str(resumed / final), "pt") as f:
        assert f.metadata()["updates"] == "4"
