"""CPU threads of a rank: how many intra-op threads, and how idle OpenMP threads wait.

Two ranks on one machine each start as many OpenMP threads as the machine has cores unless told otherwise
(torchrun sets OMP_NUM_THREADS=1 for more than one process; the deepspeed launcher sets nothing), so the
threads of all ranks fight for the cores and every parallel region waits for its slowest, descheduled thread.
When OMP_NUM_THREADS is not set, each rank takes its share: the cores it may run on ÷ the ranks on its node.

libgomp's threads spin for a while at the end of each parallel region before they sleep; with another busy
process on the cores that spinning takes the time the waited-for thread needs. gnn3d sets a short spin,
GOMP_SPINCOUNT=1000 (then sleep), unless the user chose a wait policy or spin count. Measured on the demo (obj/s
with one busy process vs without, same run): libgomp's default spin ~0.03x; spin 10000 0.26x; spin 1000 0.66x;
OMP_WAIT_POLICY=PASSIVE 0.85x, but PASSIVE cost 22 % on a quiet machine (3.3 vs 4.3 it/s). Both are read
once, when torch loads libgomp: ``preset_env`` must run before ``import torch`` (launcher/train.py's top).
The user's own environment always wins.
"""

import os
from collections.abc import MutableMapping

# Set by preset_env when gnn3d, not the user or the launcher, chose OMP_NUM_THREADS (children inherit it).
AUTO_MARK = "GNN3D_AUTO_THREADS"
# Launchers' count of the ranks on this node: torchrun and deepspeed's per-node launch respectively.
LOCAL_RANK_COUNTS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
USER_WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SHORT_SPIN = "1000"  # libgomp's spin before an idle thread sleeps (its default is 300000)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroups' cpusets, numactl)."""
    return len(os.sched_getaffinity(0))


def local_ranks(environ: MutableMapping[str, str] = os.environ) -> int:
    """Ranks the launcher started on this node (1 without a launcher)."""
    for key in LOCAL_RANK_COUNTS:
        if environ.get(key, "").isdigit() and int(environ[key]) > 0:
            return int(environ[key])
    return 1


def share_of_cores(environ: MutableMapping[str, str] = os.environ) -> int:
    """Intra-op threads per rank when nobody chose: the cores ÷ the local ranks, at least 1."""
    return max(1, available_cores() // local_ranks(environ))


def preset_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Before torch is imported: the OpenMP wait policy and thread count the user did not set themselves."""
    if not any(key in environ for key in USER_WAIT_KEYS):
        environ["GOMP_SPINCOUNT"] = SHORT_SPIN
    if "OMP_NUM_THREADS" not in environ:
        environ["OMP_NUM_THREADS"] = str(share_of_cores(environ))
        environ[AUTO_MARK] = "1"


def choose_threads(threads_per_rank: int, environ: MutableMapping[str, str] = os.environ) -> tuple[int, str]:
    """(intra-op threads, why) from run.threads_per_rank (0 = auto), the user's OMP_NUM_THREADS or the share."""
    if threads_per_rank > 0:
        return threads_per_rank, "run.threads_per_rank"
    user = environ.get("OMP_NUM_THREADS", "")
    if user and not environ.get(AUTO_MARK):
        try:
            return max(1, int(user)), "OMP_NUM_THREADS"
        except ValueError:
            pass  # not a number (libgomp takes lists like "4,2"): fall back to the share
    cores, ranks = available_cores(), local_ranks(environ)
    share = max(1, cores // ranks)
    return share, f"{cores} cores, {ranks} local ranks; set OMP_NUM_THREADS to choose"


def apply_threads(threads_per_rank: int, environ: MutableMapping[str, str] = os.environ) -> str:
    """Set torch's intra-op threads for this rank; returns the one log line that says how many and why."""
    import torch  # after preset_env ran (launcher/train.py), so libgomp saw the wait policy

    threads, why = choose_threads(threads_per_rank, environ)
    torch.set_num_threads(threads)
    return f"threads: {threads} intra-op per rank ({why})"
