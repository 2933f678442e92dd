"""Train the cross-domain multi-view UNet with DeepSpeed ZeRO.

    deepspeed launcher/train.py --deepspeed ds_configs/zero2.json                 # CPU demo, all local devices
    deepspeed launcher/train.py --deepspeed ds_configs/zero2.json --config configs/my_run.yaml train.lr=5e-5
    deepspeed --hostfile hostfile launcher/train.py --deepspeed ds_configs/zero2.json --config ...  # nodes
    python launcher/train.py ...                                                   # one process, debugging

Overrides are dotted ``section.key=value`` pairs; ``--help`` lists every key with its default.
"""

import argparse
import os
import sys
from pathlib import Path

from engine.startup import STARTUP  # first: start-up phases are timed from here
from engine.threads import preset_env

preset_env()  # OpenMP threads and wait policy: libgomp reads them once, when torch loads it (below)

from engine.config import (  # noqa: E402
    ConfigError,
    check_trainable_stage,
    describe_options,
    load_config,
    load_ds_config,
    resolve_ds_config,
)
from engine.preflight import check_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = REPO / "configs" / "demo_cpu.yaml"
DEFAULT_DS = REPO / "ds_configs" / "zero2.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="config options (section.key = default  (type)  meaning):" + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: the CPU demo)"
    )
    parser.add_argument("--deepspeed", default=str(DEFAULT_DS), help="DeepSpeed JSON (default: ZeRO-2)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument(
        "--check",
        action="store_true",
        help="run every start-up check (config, DeepSpeed JSON, model folders, shards, run dir, resume), then exit",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 run.dir=runs/x")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    STARTUP.lap("imports")
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # what the launcher set (1 without one)
    try:
        cfg = load_config(args.config, args.overrides)
        ds_config = load_ds_config(args.deepspeed)
        check_trainable_stage(ds_config, source=args.deepspeed)
        resolve_ds_config(ds_config, cfg, world_size=world_size, source=args.deepspeed, cuda=True)
        checked = check_run(cfg, world_size=world_size)  # before any process group, render or model
    except ConfigError as err:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank fails the same way; one line is enough
            print(f"config error: {err}", file=sys.stderr)
        return 2
    STARTUP.lap("config checks")
    if args.check:
        for warning in checked.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        demo = "" if cfg.data.shards else " (demo data: checked once rendered)"
        print(f"config OK: {args.config} + {args.deepspeed}{demo}")
        return 0
    from engine.train import train

    STARTUP.lap("imports")  # torch, deepspeed, diffusers
    return train(cfg, ds_config, ds_path=args.deepspeed)


if __name__ == "__main__":
    sys.exit(main())
