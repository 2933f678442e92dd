"""Cost of the multi-node launch: one ``deepspeed --hostfile`` run on 2 hosts x 2 processes, reached over ssh
(pdsh), vs the same command on 1 host x 4 processes -- same world size, config and data, in the same run.

The hosts are network namespaces with their own sshd (tests/multinode/harness.py; needs root, ip, sshd, pdsh).
Both runs go through the same runner, so the ratio isolates what the second host costs: the ssh fan-out and
gloo's traffic over veth instead of loopback. Wall time is command -> exit (launch, rendezvous, demo data from a
shared cache, training, checkpoint); ``train_s`` is the span of the logged training steps.

    python benchmarks/bench_multinode.py                        # 20 steps, writes benchmarks/results/multinode.json
    python benchmarks/bench_multinode.py --steps 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each layout, alternating (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "multinode.json")
    args = parser.parse_args()
    if (reason := unavailable_reason()) is not None:
        print(f"cannot make hosts here: {reason}", file=sys.stderr)
        return 2
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
            for i in range(args.repeats):  # alternate, so a noisy minute hits both layouts
                runs["two_nodes"].append(
                    run_once(cluster, work / f"r{i}", two, "two_nodes", args.steps, cache)
                )
                runs["one_node"].append(run_once(cluster, work / f"r{i}", one, "one_node", args.steps, cache))
        finally:
            cluster.close()
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    same_losses = all(
        abs(a - b) <= 1e-6 * max(abs(a), abs(b))
        for a, b in zip(best["two_nodes"]["losses"], best["one_node"]["losses"])
    )
    result = {
        "benchmark": "multinode",
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "config": {"world_size": 4, "steps": args.steps, "repeats": args.repeats, "model": "tiny demo, 32²"},
        "baseline": "the same deepspeed command on 1 host x 4 processes",
        "runs": {k: [{"wall_s": r["wall_s"], "train_s": r["train_s"]} for r in v] for k, v in runs.items()},
        "same_losses_rel_1e-6": same_losses,
        "ratio_wall": round(best["two_nodes"]["wall_s"] / best["one_node"]["wall_s"], 3),
        "ratio_train": round(best["two_nodes"]["train_s"] / best["one_node"]["train_s"], 3),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if same_losses else 1


if __name__ == "__main__":
    sys.exit(main())
