"""A run killed with SIGKILL and resumed logs exactly the losses of an uninterrupted run."""

import pytest

from tests.engine.runs import losses_by_step, train, train_and_kill

STEPS = ["run.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=2"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_and_resume_is_bit_exact(tmp_path, demo_cache, nproc):
    port = 29600 + nproc * 10
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(straight, demo_cache, *STEPS, nproc=nproc, port=port)
    train_and_kill(crashed, demo_cache, *STEPS, kill_after_step=5, nproc=nproc, port=port + 1)
    before = losses_by_step(crashed)
    assert max(before) >= 5 and max(before) < 8, "the kill must land mid-run"
    train(crashed, demo_cache, *STEPS, nproc=nproc, port=port + 2)

    expected, resumed = losses_by_step(straight), losses_by_step(crashed)
    assert sorted(expected) == sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "loss_normal", "loss_color"):
            assert resumed[step][key] == expected[step][key], f"step {step} {key} differs"
    # The newest checkpoint is complete and the pointer names it; no temporary save is left behind.
    ckpts = crashed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000008"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000006", "step00000008"]
