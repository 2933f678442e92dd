"""launcher/check_hostfile.py reads a hostfile as DeepSpeed does and names each bad line; DeepSpeed's own
launcher refuses the same file fast (what a user sees without the check)."""

import subprocess
import sys
import time

import pytest
from deepspeed.launcher.runner import _parse_hostfile

from launcher.check_hostfile import main, parse_hostfile
from tests.engine.runs import REPO, env

HOSTFILES = [
    "node0 slots=2\nnode1 slots=2\n",
    "# comment\n\n  node0   slots=8  \nnode1 slots=4 # trailing words are ignored\n",
    "node0 slots=2\nnode1 slots two\n",
    "node0 slots=2\nnode0 slots=2\n",
    "node0\n",
    "# only a comment\n\n",
    "node0 slots=2 max_slots=4\n",
]


@pytest.mark.parametrize("text", HOSTFILES)
def test_accepts_exactly_what_deepspeed_accepts(text):
    entries, problems = parse_hostfile(text, "hf")
    try:
        pool = _parse_hostfile(text.splitlines(keepends=True))
    except ValueError:
        pool = None
    if pool is None:
        assert problems
    else:
        assert not problems
        assert {entry.host: entry.slots for entry in entries} == dict(pool)


def test_each_problem_is_one_line_naming_file_and_line(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots two\nnode0 slots=1\n")
    assert main([str(hostfile)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{hostfile}:2: bad entry 'node1 slots two': expected 'HOST slots=N'",
        f"{hostfile}:3: node0 is listed again (first on line 1)",
    ]
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"{tmp_path / 'missing'}: cannot read: No such file or directory\n"


def test_deepspeed_refuses_a_bad_hostfile_line_quickly(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots two\n")
    started = time.monotonic()
    done = subprocess.run(
        [
            f"{sys.executable}",
            "-m",
            "deepspeed.launcher.runner",
            f"--hostfile={hostfile}",
            "launcher/train.py",
        ],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 30
    assert done.returncode != 0
    # DeepSpeed names the line's text (not its number), after a traceback; check_hostfile adds the number.
    assert "Hostfile contains a bad entry: node1 slots two" in done.stderr
