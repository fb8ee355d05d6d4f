"""``python -m ringpack plan``: the report and the picture a user reads to see how a pack is split.

Catches a report or picture that disagrees with the plan (owners, bytes or tiles per step) and bad input that
crashes with a traceback instead of exiting 2 with a message naming the option.
"""

import subprocess
import sys

import matplotlib
import pytest

import ringpack
from ringpack.__main__ import main
from ringpack.planview import _draw_map, _draw_pack, report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

MIX = "12000,7000,3000,1800,900,300,64,20,0,1"


def _status(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_report_shows_tiles_and_bytes_per_step():
    plan = ringpack.make_plan([0, 1000], 4, strategy="contiguous", window_size=(10, -1))
    text = report(plan, kv_heads=2, head_dim=4, itemsize=2)
    # rank 1 computes one tile at steps 0 and 1, and sends 10 rows x 2 (k, v) x 2 heads x 4 dims x 2 bytes at step 1
    assert "   1       250" in text and "1 1 0 0 | 0B 320B 0B 0B" in text


def test_plan_command_and_png(tmp_path):
    """The command as the README gives it, run as a user would: a report on stdout and a PNG file."""
    png = tmp_path / "plan.png"
    done = subprocess.run([sys.executable, "-m", "ringpack", "plan", "--lengths", MIX, "--world", "4",
                           "--window", "-1,64", "--png", str(png)], capture_output=True, text=True, check=True)
    assert "work max/mean" in done.stdout and f"saved to {png}" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_picture_draws_every_rank_s_pieces_where_they_lie():
    """The strip of the pack: one bar per document, and per rank one bar per segment it owns, at the segment's
    place in the pack; a document cut between ranks is marked by a dotted line at every cut."""
    plan = ringpack.make_plan(ringpack.lengths_to_cu_seqlens([int(x) for x in MIX.split(",")]), 3, strategy="zigzag")
    fig, ax = plt.subplots()
    _draw_pack(ax, plan)
    documents, *ranks = ax.collections
    assert len(documents.get_paths()) == sum(1 for a, b in zip(plan.cu_seqlens, plan.cu_seqlens[1:]) if b > a)
    for r, bars in enumerate(ranks):
        starts = sorted(round(path.vertices[:, 0].min()) for path in bars.get_paths())
        assert starts == sorted(s.start for s in plan.segments[r])
    cuts = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert len(cuts) == sum(1 for segs in plan.segments for s in segs if s.doc_offset)
    plt.close(fig)


def test_picture_maps_label_every_cell_and_rank_total():
    """The rank x step maps: every busy cell carries its value, an idle one '-', and each rank's row its total."""
    fig, ax = plt.subplots()
    _draw_map(ax, [[6, 0], [2, 2]], [["6 pairs", ""], ["2 pairs", "2 pairs"]], "Blues", "work", str)
    assert [t.get_text() for t in ax.texts] == ["6 pairs", "-", "2 pairs", "2 pairs"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0: 6, 1.20x mean", "rank 1: 4, 0.80x mean"]
    plt.close(fig)


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "10,-3"], "argument --lengths: expected document lengths: integers >= 0"),
    (["--lengths", "abc"], "argument --lengths: expected document lengths"),
    (["--lengths", "5", "--window", "abc"], "argument --window: expected LEFT,RIGHT"),
    (["--lengths", "5", "--window", "-2,0"], "argument --window: expected LEFT,RIGHT"),
    (["--lengths", "5", "--world", "0"], "argument --world: expected an integer >= 1"),
    (["--lengths", "5", "--kv-heads", "x"], "argument --kv-heads: expected an integer >= 1"),
    # these two were tracebacks (FileNotFoundError)
    (["--lengths-file", "/nonexistent/lengths.txt"], "--lengths-file /nonexistent/lengths.txt: no such file"),
    (["--lengths", "5", "--png", "/nonexistent/plan.png"], "--png /nonexistent/plan.png: folder /nonexistent does "
                                                          "not exist"),
    (["--lengths", "5", "--png", "/"], "--png /: is a folder; give a file name"),
])
def test_plan_command_rejects_bad_input_naming_the_option(argv, message, capsys):
    world = [] if "--world" in argv else ["--world", "2"]
    assert _status(["plan", *world, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_plan_reads_a_lengths_file_and_a_negative_window_without_equals(tmp_path, capsys):
    """``--window -1,3`` was "expected one argument"; a lengths file may mix commas, spaces and newlines."""
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("300, 20\n5000 0\n")
    assert main(["plan", "--lengths-file", str(lengths), "--world", "2", "--window", "-1,3"]) == 0
    assert "tokens=5320 docs=4 causal=True window=(-1, 3)" in capsys.readouterr().out
