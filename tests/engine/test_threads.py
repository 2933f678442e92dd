"""Threads per rank: each rank takes its share of the cores unless the user chose, and idle OpenMP threads sleep."""

import os
import subprocess
import sys

import pytest

from engine.threads import AUTO_MARK, SHORT_SPIN, apply_threads, choose_threads, preset_env
from tests.engine.runs import REPO, env


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_deepspeed_launch_ranks_get_their_share_and_a_short_spin(four_cores):
    environ = {"LOCAL_SIZE": "2"}  # what `deepspeed --num_gpus 2` gives each rank (no OMP_NUM_THREADS)
    preset_env(environ)
    assert environ["OMP_NUM_THREADS"] == "2" and environ["GOMP_SPINCOUNT"] == SHORT_SPIN
    assert choose_threads(0, environ) == (2, "4 cores, 2 local ranks; set OMP_NUM_THREADS to choose")


def test_the_users_settings_win(four_cores):
    torchrun = {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "3", "GOMP_SPINCOUNT": "1000"}
    preset_env(torchrun)
    assert torchrun == {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "3", "GOMP_SPINCOUNT": "1000"}
    assert choose_threads(0, torchrun) == (3, "OMP_NUM_THREADS")
    assert choose_threads(5, torchrun) == (5, "run.threads_per_rank")
    alone = {}
    preset_env(alone)
    assert alone == {"OMP_NUM_THREADS": "4", AUTO_MARK: "1", "GOMP_SPINCOUNT": SHORT_SPIN}


def test_launcher_sets_the_share_before_torch_starts_its_threads():
    """launcher/train.py as a rank of `deepspeed --num_gpus 2` on this machine imports torch with its share."""
    code = (
        "import importlib.util, os\n"
        "spec = importlib.util.spec_from_file_location('launch', 'launcher/train.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "import torch\n"
        "from engine.threads import apply_threads\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), torch.get_num_threads(), apply_threads(0), sep='|')\n"
    )
    child = {
        k: v for k, v in env().items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    child["LOCAL_SIZE"] = "2"
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // 2)
    out = subprocess.run(
        [sys.executable, "-c", code], env=child, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    policy, threads, line = out.stdout.strip().splitlines()[-1].split("|")
    assert int(threads) == share, "torch started with every core's worth of threads"
    assert policy == SHORT_SPIN
    assert (
        line
        == f"threads: {share} intra-op per rank ({cores} cores, 2 local ranks; set OMP_NUM_THREADS to choose)"
    )


def test_apply_threads_sets_torch():
    import torch

    before = torch.get_num_threads()
    try:
        assert apply_threads(1, {}) == "threads: 1 intra-op per rank (run.threads_per_rank)"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
