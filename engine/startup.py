"""Where the time from the command to the first training step goes: one line in the run log.

The launcher and ``engine.train`` call ``STARTUP.lap(phase)`` after each start-up phase; at the first step
the loop writes ``STARTUP.line()``, e.g. ``startup: python 0.1 s, imports 4.9 s, ... ; command → first step
9.6 s``. ``python`` is the interpreter's own start (process creation → this module's import), so the phases
add up to the wall time since the command. Laps cost a clock read; nothing here imports torch.
"""

from __future__ import annotations

import os
import time

STARTUP_PREFIX = "startup:"


def process_start_time() -> float | None:
    """Wall-clock time (``time.time()``) this process was created, from /proc; None where unknown."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        start_ticks = int(fields[19])  # field 22 (starttime), in clock ticks since boot
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return time.time() - uptime_s + start_ticks / os.sysconf("SC_CLK_TCK")


class StartupClock:
    """Named phase durations in the order first seen; a phase lapped twice adds up."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.reported = False
        now = time.time()
        started = process_start_time()
        self._start = started if started is not None and started <= now else now
        self._last = now
        if now > self._start:
            self.phases["python"] = now - self._start

    def lap(self, phase: str) -> float:
        """Charge the time since the previous lap to ``phase``; returns that duration (s)."""
        now = time.time()
        took = now - self._last
        self.phases[phase] = self.phases.get(phase, 0.0) + took
        self._last = now
        return took

    def total(self) -> float:
        return self._last - self._start

    def line(self) -> str:
        """``startup: python 0.1 s, imports 4.9 s, ...; command → first step 9.6 s``."""
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        return f"{STARTUP_PREFIX} {parts}; command → first step {self.total():.1f} s"

    def first_step(self, data_wait_s: float) -> str | None:
        """At the end of the first step: its time split into the wait for the first batch and the step
        itself, and the line. None after the first call (a second run in one process, e.g. tests, says nothing)."""
        if self.reported:
            return None
        self.reported = True
        now = time.time()
        took, self._last = now - self._last, now
        wait = min(max(data_wait_s, 0.0), took)
        self.phases["first batch"] = wait
        self.phases["first step"] = took - wait
        return self.line()


def parse_startup_line(line: str) -> dict[str, float]:
    """The phases of a ``startup:`` line (plus ``total``), for benchmarks and tests."""
    body = line.split(STARTUP_PREFIX, 1)[1]
    phases_text, total_text = body.rsplit(";", 1)
    phases = {}
    for part in phases_text.split(","):
        name, seconds, _unit = part.strip().rsplit(" ", 2)
        phases[name] = float(seconds)
    phases["total"] = float(total_text.split()[-2])
    return phases


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_unused_comm_op() -> bool:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op when the process group starts.

    TorchBackend builds it on every CPU start (about 2 minutes on 2 busy cores the first time, then loaded
    from TORCH_EXTENSIONS_DIR), but only its tensor-parallel *inference* all-reduce uses it; ZeRO training
    never does. DeepSpeed skips an op its compatibility table marks unavailable, so that is set here.
    Returns whether the table had the entry (an older or newer DeepSpeed without it: nothing changes).
    """
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(table, dict) or SHM_COMM_OP not in table:
        return False
    table[SHM_COMM_OP] = False
    return True


STARTUP = StartupClock()  # one per process: created when the launcher imports it first
