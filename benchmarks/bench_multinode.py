"""Cost of the multi-node launch: one ``deepspeed --hostfile`` run on 2 hosts x 2 processes, reached over ssh
(pdsh), vs the same command on 1 host x 4 processes -- same world size, config and data, in the same run.

The hosts are network namespaces with their own sshd (tests/multinode/harness.py; needs root, ip, sshd, pdsh).
Both runs go through the same runner, so the ratio isolates what the second host costs: the ssh fan-out and
gloo's traffic over veth instead of loopback. Wall time is command -> exit (launch, rendezvous, demo data from a
shared cache, training, checkpoint); ``train_s`` is the span of the logged training steps.

    python benchmarks/bench_multinode.py            # 20 steps x 2 repeats, writes benchmarks/results/multinode.json
    python benchmarks/bench_multinode.py --quick    # 10 steps x 1 repeat

run_all.py runs it only where hosts can be made (``unavailable``) and leaves it out of ``--quick`` (> 60 s).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from common import main_args, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.multinode.harness import Cluster, unavailable_reason  # noqa: E402
from tests.multinode.test_hostfile_launch import (  # noqa: E402
    deepspeed_args,
    head_env,
    run_on_head,
    write_deepspeed_env,
)


def _steps_span_s(run_dir: Path) -> tuple[float, list[float]]:
    """(seconds between the first and the last logged training step, the losses) from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "loss" in r]
    return training[-1]["time"] - training[0]["time"], [r["loss"] for r in training]


def run_once(cluster: Cluster, work: Path, hostfile: Path, label: str, steps: int, cache: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    run_dir, log = work / label, work / f"{label}.log"
    head = head_env(write_deepspeed_env(work / "deepspeed_env"))
    overrides = (f"run.max_steps={steps}", f"checkpoint.every={steps}")
    code, wall_s, _ = run_on_head(cluster, deepspeed_args(hostfile, run_dir, cache, *overrides), head, log)
    if code != 0:
        raise SystemExit(f"{label}: exit {code}, see {log}")
    train_s, losses = _steps_span_s(run_dir)
    return {"wall_s": round(wall_s, 2), "train_s": round(train_s, 2), "losses": losses}


QUICK = False  # about 2.5 minutes: a cluster, a warm-up run and 2 x 2 launches
GOAL = 1.10  # the second host may cost at most 10 % of the wall time


def unavailable() -> str | None:
    """Why hosts cannot be made here (run_all skips the benchmark with it), or None."""
    return unavailable_reason()


def measure(steps: int, repeats: int) -> dict[str, list[dict]]:
    """Wall and training time of each layout, ``repeats`` times, alternating, on a fresh 2-node cluster."""
    with tempfile.TemporaryDirectory(prefix="gnn3d-bench-multinode-") as tmp:
        work = Path(tmp)
        cluster = Cluster(work / "cluster", 2).start()
        try:
            two = cluster.write_hostfile(work / "hostfile_two", slots=2)
            one = work / "hostfile_one"
            one.write_text("node0 slots=4\n")
            cache = work / "demo_cache"
            run_once(
                cluster, work / "warmup", one, "warmup", 2, cache
            )  # renders the demo data, JIT op cached
            runs: dict[str, list[dict]] = {"two_nodes": [], "one_node": []}
            for i in range(repeats):  # alternate, so a noisy minute hits both layouts
                runs["two_nodes"].append(run_once(cluster, work / f"r{i}", two, "two_nodes", steps, cache))
                runs["one_node"].append(run_once(cluster, work / f"r{i}", one, "one_node", steps, cache))
        finally:
            cluster.close()
    return runs


def payload(runs: dict[str, list[dict]], steps: int, repeats: int) -> dict:
    """Ratio: best wall time of 2 hosts x 2 processes over 1 host x 4; met only with the same losses."""
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    same_losses = all(
        abs(a - b) <= 1e-6 * max(abs(a), abs(b))
        for a, b in zip(best["two_nodes"]["losses"], best["one_node"]["losses"])
    )
    ratio_wall = round(best["two_nodes"]["wall_s"] / best["one_node"]["wall_s"], 3)
    ratio_train = round(best["two_nodes"]["train_s"] / best["one_node"]["train_s"], 3)
    return {
        "config": {"world_size": 4, "steps": steps, "repeats": repeats, "model": "tiny demo, 32²"},
        "raw": {
            "runs": {
                k: [{"wall_s": r["wall_s"], "train_s": r["train_s"]} for r in v] for k, v in runs.items()
            },
            "same_losses_rel_1e-6": same_losses,
            "ratio_train": ratio_train,
        },
        "ratio": ratio_wall,
        "goal": f"<= {GOAL:g}x wall time, same losses",
        "met": ratio_wall <= GOAL and same_losses,
        "baseline": "the same deepspeed command on 1 host x 4 processes",
        "summary": (
            f"deepspeed --hostfile over 2 hosts (ssh/pdsh, gloo over veth) takes {ratio_wall:.2f}x the wall "
            f"time of 1 host x 4 processes (training steps {ratio_train:.2f}x); losses "
            + ("identical." if same_losses else "DIFFER.")
        ),
    }


def run(quick: bool) -> dict:
    steps, repeats = (10, 1) if quick else (20, 2)
    return payload(measure(steps, repeats), steps, repeats)


def main(argv: list[str] | None = None) -> int:
    def add_args(p) -> None:
        p.add_argument("--steps", type=int, default=None, help="training steps per run (default 20)")
        p.add_argument("--repeats", type=int, default=None, help="runs of each layout (default 2)")

    args = main_args(__doc__.split("\n\n")[0], argv, add_args)
    if (reason := unavailable()) is not None:
        print(f"cannot make hosts here: {reason}", file=sys.stderr)
        return 2
    steps = args.steps or (10 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 2)
    result = payload(measure(steps, repeats), steps, repeats)
    print(json.dumps(result, indent=2))
    print(f"wrote {write_result('multinode', result)}")
    return 0 if result["raw"]["same_losses_rel_1e-6"] else 1


if __name__ == "__main__":
    sys.exit(main())
