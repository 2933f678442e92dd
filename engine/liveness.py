"""A rank that goes away mid-run, named: heartbeats in the rendezvous store, read when a collective fails.

A collective with a dead peer either fails at once (its process died, so its sockets closed: "Connection reset
by peer") or after ``run.collective_timeout_s`` (its node vanished, froze or lost the network). Neither error
says which rank is gone, and every rank would print a long gloo traceback. So each rank's daemon thread bumps a
counter in the store on rank 0's node (MASTER_ADDR:MASTER_PORT) every ``HEARTBEAT_S``; when a collective fails,
the rank reads all counters twice, ``WINDOW_S`` apart. A rank whose counter stood still is lost (killed, its node
down or frozen). When the store itself does not answer, rank 0's node, which serves it, is the one lost.

The first rank to reach a verdict posts it, and every rank that stops marks itself as leaving, so the ranks that
notice later name the rank lost first, not each other. Each survivor prints one line and exits with
``EXIT_UNAVAILABLE`` (69); the launcher on each node then stops its other ranks.
"""

import contextlib
import json
import os
import re
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from engine.checkpoint import checkpoint_root, read_latest
from engine.console import say
from engine.distributed import EXIT_UNAVAILABLE, master_address, uses_agent_store

__all__ = ["EXIT_UNAVAILABLE", "Liveness", "is_peer_failure", "resume_hint"]

HEARTBEAT_S = 1.0
# Counters are compared this far apart: several beats, so a live rank whose thread waits for the GIL now and
# then is not taken for a lost one.
WINDOW_S = 4.0
# A store operation that takes longer than this means the store (rank 0's node) is gone or frozen.
STORE_TIMEOUT_S = 10.0
# Rank 0 keeps serving the store this long at most, for the survivors that noticed the loss after it did.
_SERVE_S = WINDOW_S + 5.0

# How gloo, NCCL and the c10d store say that a peer or the connection to it is gone.
_PEER_FAILURE_TEXT = (
    "gloo",
    "nccl",
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "timed out",
    "timeout",
)
_TORCH_DISTRIBUTED = f"{os.sep}torch{os.sep}distributed{os.sep}"


def is_peer_failure(error: BaseException) -> bool:
    """True when ``error`` (or what caused it) is a collective or store failure, as a lost peer causes: a
    DistError, or a RuntimeError raised in torch.distributed or saying so (gloo raises plain RuntimeErrors,
    "Application timeout caused pair closure" among them)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, dist.DistError):
            return True
        if isinstance(error, RuntimeError) and (
            _raised_in_torch_distributed(error) or any(t in str(error).lower() for t in _PEER_FAILURE_TEXT)
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _raised_in_torch_distributed(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and _TORCH_DISTRIBUTED in frame.tb_frame.f_code.co_filename


def short_reason(error: BaseException) -> str:
    """The first sentence of a gloo/NCCL error, without its source location."""
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", str(error).strip().splitlines()[0])
    return text.split(". This is typically")[0].rstrip(".")


def _bounded(call, timeout_s: float) -> list:
    """``[call()]``, or ``[]`` when it did not return within ``timeout_s``: a store call to a frozen node (power
    lost, network cut) blocks without end, as its TCP connection stays open."""
    result: list = []

    def run() -> None:
        with contextlib.suppress(dist.DistError):  # the store went away: as good as no answer
            result.append(call())

    worker = threading.Thread(target=run, name="liveness-store", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result


def _store_gone() -> str:
    return f"lost rank 0's node: the store it serves at {master_address()} (MASTER_ADDR:MASTER_PORT) does not answer"


def _close_process_group() -> None:
    """Close this rank's connections now, so that ranks blocked in a collective with it fail at once instead of
    at this process's exit (bounded: a daemon thread, in case the backend blocks)."""

    def close() -> None:
        with contextlib.suppress(Exception):  # a broken group may complain; it is going away either way
            dist.destroy_process_group()

    if dist.is_initialized():
        closer = threading.Thread(target=close, name="close-group", daemon=True)
        closer.start()
        closer.join(5.0)


def resume_hint(run_dir: str) -> str:
    """Where a restarted job (run.resume=auto) continues."""
    root = checkpoint_root(Path(run_dir).expanduser())
    tag = read_latest(root) if root.is_dir() else None
    if tag is None:
        return "no checkpoint was saved yet; a restart begins at step 0"
    return f"last good checkpoint: {root / tag}; start the job again (run.resume=auto) to continue from there"


class Liveness:
    """This rank's heartbeat in the store, and the verdict on who is gone after a collective failed."""

    def __init__(self, rank: int, world_size: int, collective_timeout_s: float = 1800.0, run_dir: str = ""):
        self.rank, self.world_size, self._run_dir = rank, world_size, run_dir
        self._collective_timeout_s = collective_timeout_s
        # gloo does not always time out (measured: a frozen peer, a ZeRO all-reduce waiting in Work::wait past
        # its timeout), so a peer silent this long ends the run whatever the main thread is doing.
        self._give_up_s = collective_timeout_s + 2 * HEARTBEAT_S
        self._explaining = threading.Event()
        # Keys of an earlier attempt of a torchrun job (--max-restarts) live on in the agent's store.
        self._prefix = f"gnn3d/liveness/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        # A client of its own: a short timeout, independent of the process group's collective timeout.
        self._store = dist.TCPStore(
            host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False
        )
        who = {"host": socket.gethostname(), "pid": os.getpid()}
        self._store.set(self._key("who", rank), json.dumps(who))
        self._store.set(self._key("beat", rank), "0")
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="liveness", daemon=True).start()
        threading.Thread(target=self._watch, name="liveness-watch", daemon=True).start()

    @classmethod
    def start(
        cls, rank: int, world_size: int, collective_timeout_s: float, run_dir: str
    ) -> "Liveness | None":
        """The heartbeat of this rank (after the rendezvous); None for a one-process run."""
        return cls(rank, world_size, collective_timeout_s, run_dir) if world_size > 1 else None

    def stop(self) -> None:
        self._stop.set()

    def _key(self, kind: str, rank: int | None = None) -> str:
        return f"{self._prefix}/{kind}" if rank is None else f"{self._prefix}/{kind}/{rank}"

    def _beat(self) -> None:
        count = 0
        while not self._stop.wait(HEARTBEAT_S):
            count += 1
            try:
                self._store.set(self._key("beat", self.rank), str(count))
            except dist.DistError:  # the store is gone: the verdict will say so
                return

    def _watch(self) -> None:
        """A peer without a heartbeat, or a store without an answer, for about ``run.collective_timeout_s``
        ends this process, also when the main thread waits in a collective that never times out. Heartbeats
        come from a thread, so a peer busy in a long validation or save keeps beating."""
        peers = [r for r in range(self.world_size) if r != self.rank]
        last: dict[int, str | None] = {}
        changed = dict.fromkeys(peers, time.monotonic())
        answered = time.monotonic()
        interval = max(HEARTBEAT_S, min(30.0, self._give_up_s / 10))
        while not self._stop.wait(interval):
            now = time.monotonic()
            if found := _bounded(lambda: self._counters(peers), STORE_TIMEOUT_S):
                answered = now
                for r, count in found[0].items():
                    if count != last.get(r):
                        last[r], changed[r] = count, now
            stale = [r for r in peers if now - changed[r] > self._give_up_s]
            if now - answered > self._give_up_s:
                verdict = _store_gone()
            elif stale:
                names = _bounded(lambda stale=stale: self._describe(stale), STORE_TIMEOUT_S)
                verdict = (
                    f"lost {names[0] if names else stale}: no heartbeat for {now - changed[stale[0]]:.0f} s"
                )
                posted = _bounded(lambda v=verdict, s=stale: self._post(v, s), STORE_TIMEOUT_S)
                verdict = posted[0][0] if posted else verdict  # a rank that noticed first
            else:
                continue
            if self._explaining.is_set() or self._stop.is_set():  # the main thread is on it
                return
            self.leave(f"stopped after: {verdict}")
            _bounded(lambda s=stale: self._serve_the_others(s, interval + _SERVE_S), interval + _SERVE_S + 1)
            say(
                f"[rank {self.rank}] {verdict} (run.collective_timeout_s={self._collective_timeout_s:g}); the run "
                f"stopped (exit {EXIT_UNAVAILABLE}); {resume_hint(self._run_dir)}"
            )
            os._exit(EXIT_UNAVAILABLE)  # the main thread is stuck in C++: no other way out

    def leave(self, reason: str) -> None:
        """Tell the other ranks that this one stops on purpose (so they do not report it as lost)."""
        self.stop()
        _bounded(lambda: self._store.set(self._key("left", self.rank), reason), STORE_TIMEOUT_S)

    def explain(self, error: BaseException) -> str | None:
        """One line naming the lost rank(s) when ``error`` is a failed collective and a rank is gone; else None.

        Takes about ``WINDOW_S`` (rank 0 up to ``WINDOW_S`` more, serving the verdict). Marks this rank as leaving.
        """
        if not is_peer_failure(error):
            return None
        self._explaining.set()
        _close_process_group()
        serving = _SERVE_S if self.rank == 0 else 0.0  # see _serve_the_others
        found = _bounded(self._conclude, WINDOW_S + STORE_TIMEOUT_S + serving)
        verdict = found[0] if found else _store_gone()
        if verdict is None:
            return None
        return f"{verdict} ({short_reason(error)}); the run stopped (exit {EXIT_UNAVAILABLE})"

    def _conclude(self) -> str | None:
        try:
            verdict, lost = self._verdict()
        except dist.DistError:
            return _store_gone()
        if verdict is not None:
            self.leave(f"stopped after: {verdict}")
            self._serve_the_others(lost)
        return verdict

    def _serve_the_others(self, lost: list[int], longest_s: float = _SERVE_S) -> None:
        """Rank 0's process serves the store: keep it until the other survivors have read the verdict
        (bounded), or they would take rank 0 for the lost one."""
        if self.rank != 0 or uses_agent_store():
            return
        deadline = time.monotonic() + longest_s
        waiting = [r for r in range(1, self.world_size) if r not in lost]
        with contextlib.suppress(dist.DistError):
            while waiting and time.monotonic() < deadline:
                waiting = [r for r in waiting if self._read(self._key("left", r)) is None]
                time.sleep(0.2)

    def _verdict(self) -> tuple[str | None, list[int]]:
        """(one phrase naming the lost or departed ranks, the lost ranks); (None, []) when all are alive."""
        peers = [r for r in range(self.world_size) if r != self.rank]
        if (earlier := self._earlier_verdict()) is not None:  # a rank that noticed first
            return earlier
        first = self._counters(peers)
        time.sleep(WINDOW_S)
        if (earlier := self._earlier_verdict()) is not None:
            return earlier
        left = {r: self._read(self._key("left", r)) for r in peers}
        second = self._counters(peers)
        lost = [r for r in peers if first[r] == second[r] and left[r] is None]
        if lost:
            found = f"lost {self._describe(lost)}: no heartbeat for {WINDOW_S:g} s"
        elif stopped := [r for r in peers if left[r] is not None]:
            found = f"{self._describe(stopped)} left the run ({left[stopped[0]]})"
        else:  # everyone is alive: a rank is stuck, not gone; the traceback is the better report
            return None, []
        return self._post(found, lost)

    def _post(self, found: str, lost: list[int]) -> tuple[str, list[int]]:
        """Post this rank's verdict unless another rank's came first; returns the one that stands."""
        posted = json.dumps({"verdict": found, "lost": lost})
        return self._earlier_verdict(self._store.compare_set(self._key("verdict"), "", posted).decode())

    def _earlier_verdict(self, posted: str | None = None) -> tuple[str, list[int]] | None:
        posted = posted if posted is not None else self._read(self._key("verdict"))
        if posted is None:
            return None
        found = json.loads(posted)
        return found["verdict"], found["lost"]

    def _counters(self, ranks: list[int]) -> dict[int, str | None]:
        return {r: self._read(self._key("beat", r)) for r in ranks}

    def _read(self, key: str) -> str | None:
        return self._store.get(key).decode() if self._store.check([key]) else None

    def _describe(self, ranks: list[int]) -> str:
        parts = []
        for r in ranks:
            who = self._read(self._key("who", r))
            where = json.loads(who) if who else {}
            parts.append(f"rank {r} (host {where.get('host', '?')}, pid {where.get('pid', '?')})")
        return ", ".join(parts)
