"""A message from a watch thread starts a line of its own while rank 0's progress bar is drawn."""

import sys

from tqdm import tqdm

from engine.console import say


def test_a_message_printed_while_the_bar_is_drawn_starts_its_own_line(capsys):
    bar = tqdm(total=10, desc="train", file=sys.stderr, mininterval=0)
    bar.update(3)  # the bar's line is drawn, with no newline after it
    say("[rank 0] lost rank 1 (host h, pid 1): no heartbeat")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert "[rank 0] lost rank 1 (host h, pid 1): no heartbeat" in lines, lines
