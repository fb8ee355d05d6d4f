"""``python -m ringpack plan``: the report a user reads to see how a pack is split.

Catches a report that disagrees with the plan (bytes or tiles per step) and bad input that crashes
instead of saying what is wrong.
"""

import subprocess
import sys

import ringpack
from ringpack.planview import report


def test_report_shows_tiles_and_bytes_per_step():
    plan = ringpack.make_plan([0, 1000], 4, strategy="contiguous", window_size=(10, -1))
    text = report(plan, kv_heads=2, head_dim=4, itemsize=2)
    # rank 1 computes one tile at steps 0 and 1, and sends 10 rows x 2 (k, v) x 2 heads x 4 dims x 2 bytes at step 1
    assert "   1       250" in text and "1 1 0 0 | 0B 320B 0B 0B" in text


def test_plan_command_and_png(tmp_path):
    png = tmp_path / "map.png"
    done = subprocess.run([sys.executable, "-m", "ringpack", "plan", "--lengths", "5000,300,20", "--world", "2",
                           "--png", str(png)], capture_output=True, text=True, check=True)
    assert "work max/mean" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_command_rejects_bad_lengths():
    done = subprocess.run([sys.executable, "-m", "ringpack", "plan", "--lengths", "10,-3", "--world", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "document lengths must be >= 0" in done.stderr
