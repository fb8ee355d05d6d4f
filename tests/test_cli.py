"""``python -m ringpack check``: its options, its verdicts and its exit status.

Most tests run in this process with one rank (no process group, or a one-rank gloo group); one test
spawns the real 2-rank CPU check. Tolerances are the check's own (1e-10 in float64).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import subprocess
import sys

import pytest
import torch

from ringpack import checking, cli
from ringpack.__main__ import main
from ringpack.checking import Case, run_case, token_mix

MIX = (0, 1, 7, 97, 31, 0, 13, 64)  # a 1-rank balanced plan reorders these documents


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_check_parser(parser.add_subparsers())
    return parser.parse_args(["check", *argv])


def test_single_device_yardstick_is_compared_in_the_plan_order():
    """The one-device run of a ``balanced`` plan holds documents in the plan's order, not the global one;
    comparing it in global order made the low-precision yardstick O(1) and every bf16 verdict meaningless."""
    result = run_case(Case(lengths=MIX, strategy="balanced"))
    assert result.ok, result.reason
    assert max(result.kernel_errors.values()) < 1e-12


def test_low_precision_is_judged_by_norm_wise_error():
    """A 16-bit ring rounds each tile's partial result once more than one device does, so a single entry may
    land one 16-bit step further off (max error ratio 2-3x); judging the max made correct zigzag runs fail.
    The norm-wise relative error ratio stays near 1 for correct rounding and is what 16-bit cases are judged
    by; a real slip (a ratio of 2) must still fail, and a float64 case stays judged by its max error."""
    names = checking.GRAD_NAMES
    zero = dict.fromkeys(names, 0)

    def result(dtype, max_ratio, rel_ratio):
        r = checking.Result(Case(lengths=(8,), dtype=dtype), nonfinite=zero, hidden=zero, leaked=zero,
                            errors=dict.fromkeys(names, 3e-2 * max_ratio), kernel_errors=dict.fromkeys(names, 3e-2),
                            rel_errors=dict.fromkeys(names, 1e-2 * rel_ratio),
                            kernel_rel_errors=dict.fromkeys(names, 1e-2))
        return checking._judge(r), r.error_ratio

    assert result("bfloat16", 3.0, 1.1) == ("", pytest.approx(1.1))
    reason, ratio = result("bfloat16", 1.0, 2.0)
    assert reason.startswith("out relative error 2.00e-02 > 1.50e-02") and ratio == pytest.approx(2.0)
    float64 = checking.Result(Case(lengths=(8,)), nonfinite=zero, hidden=zero, leaked=zero,
                              errors=dict.fromkeys(names, 1e-9))
    assert checking._judge(float64).startswith("out max error 1.00e-09 > 1.00e-10")


def test_token_mix_adds_up_and_holds_the_edge_cases():
    """--tokens must give exactly N tokens, with an empty, a one-token and a long document, the same on every rank."""
    lengths = token_mix(1000, seed=3)
    assert sum(lengths) == 1000
    assert 0 in lengths and 1 in lengths and max(lengths) >= 333
    assert lengths == token_mix(1000, seed=3)
    assert sum(token_mix(2)) == 2 and sum(token_mix(1)) == 1
    with pytest.raises(ValueError, match="tokens must be an integer >= 1"):
        token_mix(0)


def test_options_replace_fields_of_every_suite_case():
    """Each case option must reach every case (none silently ignored) and cases made equal must run once."""
    cases = cli._cases(_args("--dtype", "bfloat16", "--lengths", "5,6", "--heads", "8", "--kv-heads", "2",
                             "--head-dim", "8", "--softcap", "3", "--backend", "reference"), 2)
    assert all((c.dtype, c.lengths, c.heads, c.kv_heads, c.head_dim, c.softcap, c.backend)
               == ("bfloat16", (5, 6), 8, 2, 8, 3.0, "reference") for c in cases)
    assert len(cases) == 12  # 3 strategies x 4 masks; the 3 head layouts became one
    causal = cli._cases(_args("--causal", "--window", "4,0", "--strategy", "zigzag"), 2)
    assert {(c.strategy, c.causal, c.window_size) for c in causal} == {("zigzag", True, (4, 0))}
    assert len(causal) == 3
    assert len(cli._cases(_args(), 2)) == 36
    tokens = cli._cases(_args("--tokens", "300", "--seed", "1", "--inject", "inf"), 2)
    assert all(c.lengths == token_mix(300, seed=1) and c.inject == "inf" for c in tokens)


def test_lengths_file(tmp_path):
    """--lengths-file must be read (commas, spaces or newlines) and a malformed one named in the error."""
    good = tmp_path / "lengths.txt"
    good.write_text("40, 3\n0 1\n")
    assert {c.lengths for c in cli._cases(_args("--lengths-file", str(good)), 2)} == {(40, 3, 0, 1)}
    bad = tmp_path / "bad.txt"
    bad.write_text("40 x")
    with pytest.raises(ValueError, match="bad.txt: expected document lengths"):
        cli._cases(_args("--lengths-file", str(bad)), 2)


@pytest.mark.parametrize("argv, message", [
    (["--kv-heads", "3"], "heads (4) must be a multiple of kv_heads (3)"),
    (["--lengths", "3,a"], "--lengths: expected document lengths"),
    (["--lengths", "3,-1"], "all >= 0"),
    (["--lengths-file", "/nonexistent/lengths"], "no such file"),
    (["--json", "/nonexistent/out.json"], "does not exist"),
    (["--window=-2,0"], "window"),
])
def test_bad_options_exit_2_naming_the_problem(argv, message, capsys):
    """Bad input must stop the check before any rank starts, with status 2 and a message naming it."""
    assert main(["check", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--timeout", "0"], ["--world", "0"], ["--lengths", "1", "--tokens", "5"],
                                  ["--backend", "nope"], ["--dtype", "int8"], ["--inject", "zero"]])
def test_malformed_options_are_argparse_errors(argv):
    """Options argparse can judge alone must be refused by it (exit status 2), not reach a rank."""
    with pytest.raises(SystemExit) as exc:
        main(["check", *argv])
    assert exc.value.code == 2


def test_injected_nan_reaches_the_output():
    """A NaN in a key must show in out and lse exactly where the float64 reference has it."""
    result = run_case(Case(lengths=MIX, inject="nan", strategy="zigzag"))
    assert result.ok, result.reason
    assert result.nonfinite["out"] > 0 and result.nonfinite["lse"] > 0
    assert result.hidden == dict.fromkeys(checking.GRAD_NAMES, 0)


def test_hidden_nan_fails_the_check(monkeypatch):
    """A kernel that scrubs NaN (nan_to_num) would pass a check that only looked at finite errors."""
    real = checking.ring_attention

    def scrubbing(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return torch.nan_to_num(out), lse

    monkeypatch.setattr(checking, "ring_attention", scrubbing)
    result = run_case(Case(lengths=MIX, inject="nan"))
    assert not result.ok
    assert "hidden in out" in result.reason


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failed_case_gives_exit_status_1(monkeypatch, capsys):
    """Under a launcher, one failing case must make the check exit 1 and say FAIL with the reason."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port()), "RINGPACK_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    real = cli.run_case

    def failing(case, **kwargs):
        return dataclasses.replace(real(case, **kwargs), ok=False, reason="out error 1.00e+00 > 1.00e-10")

    monkeypatch.setattr(cli, "run_case", failing)
    argv = ["check", "--strategy", "contiguous", "--causal", "--window=-1,-1", "--heads", "2", "--lengths", "9,2"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL: out error 1.00e+00" in out and "0 passed, 1 failed" in out


def test_spawned_check_reports_table_progress_and_json(tmp_path):
    """Launched plainly, the check must spawn 2 CPU ranks, print a row per case as it goes, and write JSON
    with every tensor's error; the injected NaN must be reported as propagated, not as a failure."""
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, "-m", "ringpack", "check", "--strategy", "zigzag", "--causal",
                          "--window=-1,-1", "--lengths", "40,3,0,1,17", "--inject", "nan", "--json", str(out),
                          "--timeout", "60"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world=2 launcher=spawn device=cpu" in run.stdout
    assert "[1/3] zigzag causal h4/4 T=61 +nan" in run.stdout and "3 passed, 0 failed" in run.stdout
    report = json.loads(out.read_text())
    assert (report["world"], report["passed"], report["failed"]) == (2, 3, 0)
    first = report["results"][0]
    assert set(first["errors"]) == set(checking.GRAD_NAMES) == set(first["kernel_errors"])
    assert first["nonfinite"]["out"] > 0 and first["ok"]


def test_single_device_yardstick_required_below_float64():
    """Skipping the one-device run is only sound for float64, whose bound does not depend on it."""
    with pytest.raises(ValueError, match="needs dtype float64"):
        run_case(Case(lengths=(5,), dtype="bfloat16"), single_device=False)

