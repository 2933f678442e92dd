"""Preemption: on SIGTERM or SIGUSR1 every rank finishes its step, one checkpoint is saved, the run exits 75.

Clusters warn before they kill: Kubernetes and SLURM send SIGTERM and SIGKILL after a grace period
(terminationGracePeriodSeconds / KillWait, 30 s by default); SLURM ``--signal=USR1@T`` sends SIGUSR1 T seconds
before the time limit. The handler only records the signal. After every step the loop calls
``stop_agreed()``: an all-reduce (MAX) of one flag, so all ranks stop after the same step even when the signal
reaches them at slightly different times (or only some of them).

Launchers (measured): deepspeed forwards a SIGTERM to its ranks and SIGKILLs them 30 s later; it dies on a
SIGUSR1 itself, while its ranks (same process group) still save and exit 75. torchrun starts its ranks in their
own session, forwards SIGTERM (SIGKILL 30 s later) and dies on SIGUSR1 without forwarding it unless started with
``--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``. Either way the launcher's own exit code is not 75.
"""

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from engine.console import say

# sysexits.h EX_TEMPFAIL ("try again later"): the checkpoint of the last step is complete, start the run again.
# Not 143 (128 + SIGTERM): a shell reports that for a process SIGTERM killed before it saved anything.
EXIT_PREEMPTED = 75
# The checkpoint did not finish within checkpoint.preempt_grace_s; the previous complete one is still `latest`.
EXIT_SAVE_TOO_SLOW = 1

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_shield_forked_children = False  # set while a Preemption is active; read by the at-fork hook below


def _block_preempt_signals_in_child() -> None:
    """DataLoader workers share the process group, so a cluster's signal reaches them too, and torch's worker
    SIGTERM handler would end them mid-step. They get the signals blocked; the training process shuts them down."""
    if _shield_forked_children:
        signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)


os.register_at_fork(after_in_child=_block_preempt_signals_in_child)


class Preemption:
    """A training process's preemption state: the first signal received, the step all ranks stopped after."""

    def __init__(self, grace_s: float, rank: int):
        self.grace_s, self.rank = grace_s, rank
        self.signum: int | None = None  # the first preemption signal received by this rank
        self.received_at: float | None = None  # time.monotonic() of that signal
        self.stopped_at_step: int | None = None  # set once all ranks agreed to stop
        self._previous: dict[int, object] = {}
        self._saved = threading.Event()

    def install(self) -> "Preemption":
        """Handle the preemption signals in this (training) process; call ``restore()`` when the run ends."""
        global _shield_forked_children
        for signum in PREEMPT_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        _shield_forked_children = True
        return self

    def restore(self) -> None:
        """The handlers from before ``install()``; the grace-period watchdog stands down."""
        global _shield_forked_children
        self._saved.set()
        _shield_forked_children = False
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        # Only records (a later signal, e.g. the launcher forwarding the same SIGTERM, changes nothing).
        if self.received_at is None:
            self.signum, self.received_at = signum, time.monotonic()

    def stop_agreed(self, step: int, device: torch.device) -> bool:
        """Collective, once per step: True on every rank when any rank has received a preemption signal.

        On the first True the grace-period watchdog starts: it ends the process if the checkpoint that
        follows is not saved (``saved()``) within ``grace_s`` of the signal.
        """
        flag = torch.tensor([0.0 if self.received_at is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0.0:
            return False
        if self.stopped_at_step is None:
            self.stopped_at_step = step
            self._start_watchdog(step)
        return True

    def saved(self) -> None:
        """The preemption checkpoint is complete: the watchdog stands down."""
        self._saved.set()

    def _start_watchdog(self, step: int) -> None:
        since = self.received_at if self.received_at is not None else time.monotonic()
        left = self.grace_s - (time.monotonic() - since)
        if self.rank == 0:
            how = signal.Signals(self.signum).name if self.signum else "a preemption signal on another rank"
            say(
                f"preempted ({how}) after step {step}: saving a checkpoint, then exiting with code "
                f"{EXIT_PREEMPTED} ({left:.1f} s of checkpoint.preempt_grace_s={self.grace_s:g} left)"
            )
        if self.grace_s > 0:
            threading.Thread(target=self._expire, args=(step, left), daemon=True).start()

    def _expire(self, step: int, left: float) -> None:
        if self._saved.wait(max(left, 0.0)):
            return
        say(
            f"[rank {self.rank}] preempted: the checkpoint of step {step} did not finish within "
            f"checkpoint.preempt_grace_s={self.grace_s:g} s; exiting (checkpoints/latest still names the previous "
            f"complete checkpoint, if any; raise the key together with the cluster's grace period)"
        )
        os._exit(EXIT_SAVE_TOO_SLOW)
