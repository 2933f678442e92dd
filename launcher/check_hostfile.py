"""Check a DeepSpeed hostfile before a multi-node launch: its lines, and password-less ssh to every host.

    python launcher/check_hostfile.py hostfile                # exit 0: OK; exit 2: one line per problem
    python launcher/check_hostfile.py hostfile --timeout 10 --ssh-port 2222

Why: ``deepspeed --hostfile`` tries ssh only on the first host. A later host that does not answer makes pdsh
report it and exit, while the ranks already started wait for the missing ones until the rendezvous times out.
The lines are read with DeepSpeed's own rule (``HOST slots=N``; blank lines and ``#`` comments skipped; a
host listed twice is an error), so a file that passes here is one DeepSpeed accepts.
"""

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # the pattern of deepspeed/launcher/runner.py


@dataclass(frozen=True)
class HostEntry:
    line: int
    host: str
    slots: int


def parse_hostfile(text: str, source: str) -> tuple[list[HostEntry], list[str]]:
    """The hosts of a hostfile and its problems, each problem one line naming ``source:line``."""
    entries: list[HostEntry] = []
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = HOST_LINE.search(line)
        if match is None:
            problems.append(f"{source}:{number}: bad entry {line!r}: expected 'HOST slots=N'")
        elif match.group(1) in first_seen:
            host = match.group(1)
            problems.append(f"{source}:{number}: {host} is listed again (first on line {first_seen[host]})")
        else:
            first_seen[match.group(1)] = number
            entries.append(HostEntry(number, match.group(1), int(match.group(2))))
    if not entries and not problems:
        problems.append(f"{source}: no hosts (expected lines 'HOST slots=N')")
    return entries, problems


def ssh_problems(entries: list[HostEntry], source: str, timeout_s: float, port: int | None) -> list[str]:
    """Run ``ssh HOST true`` on every host at once; one line for each host that fails or stays silent."""
    port_args = ["-p", str(port)] if port else []
    options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(timeout_s))}"]
    running = {
        entry: subprocess.Popen(
            ["ssh", *options, *port_args, entry.host, "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for entry in entries
    }
    deadline = time.monotonic() + timeout_s + 2  # ConnectTimeout bounds the connect; this, the login too
    problems = []
    for entry, proc in running.items():
        where = f"{source}:{entry.line}: {entry.host}"
        try:
            _, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            problems.append(f"{where}: no answer over ssh within {timeout_s:g} s")
            continue
        if proc.returncode != 0:
            reason = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            problems.append(f"{where}: ssh failed: {reason}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hostfile", type=Path, help="the file given to deepspeed --hostfile")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each host (default 10)"
    )
    parser.add_argument("--ssh-port", type=int, default=None, help="ssh port, as deepspeed --ssh_port")
    args = parser.parse_args(argv)
    source = str(args.hostfile)
    try:
        text = args.hostfile.read_text()
    except OSError as err:
        print(f"{source}: cannot read: {err.strerror}", file=sys.stderr)
        return 2
    entries, problems = parse_hostfile(text, source)
    if not problems:
        problems = ssh_problems(entries, source, args.timeout, args.ssh_port)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 2
    slots = sum(entry.slots for entry in entries)
    print(f"{source} OK: {len(entries)} hosts, {slots} slots, ssh answers on every host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
