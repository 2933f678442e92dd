"""One line to stderr that starts on a line of its own, even while rank 0's progress bar is drawn.

Messages printed from watch threads (a lost rank, a preemption deadline, a lost lock) would otherwise be glued
to the end of the bar's line, where neither a user nor ``grep '^\\[rank'`` finds them.
"""

import sys

from tqdm import tqdm


def say(line: str) -> None:
    """Clear any bar on stderr, print ``line``, redraw the bar. Takes no lock: the caller may be a watch thread
    that must not wait on a main thread stuck in a collective."""
    tqdm.write(line, file=sys.stderr, nolock=True)
    sys.stderr.flush()
