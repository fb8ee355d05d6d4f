"""``python -m ringpack check``: its options, its verdicts and its exit status.

Most tests run in this process with one rank (no process group, or a one-rank gloo group); one test
spawns the real 2-rank CPU check. Tolerances are the check's own (1e-10 in float64).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from ringpack import checking, cli, planview
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


def _status(argv: list[str]) -> int:
    """The exit status of ``python -m ringpack ARGV`` run in this process (argparse's errors exit 2 itself)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, message", [
    (["--kv-heads", "3"], "heads (4) must be a multiple of kv_heads (3)"),
    (["--lengths", "3,a"], "argument --lengths: expected document lengths"),
    (["--lengths", "3,-1"], "integers >= 0"),
    # an empty --lengths ran the suite's own lengths
    (["--lengths", ""], "argument --lengths: expected document lengths"),
    (["--lengths-file", "/nonexistent/lengths"], "--lengths-file /nonexistent/lengths: no such file"),
    (["--json", "/nonexistent/out.json"], "does not exist"),
    (["--json", "/"], "--json /: is a folder; give a file name"),  # was a traceback after every case had run
    (["--window=-2,0"], "argument --window: expected LEFT,RIGHT"),
    (["--window", "3"], "argument --window: expected LEFT,RIGHT"),
    # softcap=inf passed every case with error 0 on all-NaN results; NaN ran uncapped
    (["--softcap", "inf"], "argument --softcap: expected a finite number >= 0"),
    (["--softcap", "nan"], "argument --softcap: expected a finite number >= 0"),
    (["--softcap", "-1"], "argument --softcap: expected a finite number >= 0"),
    # --timeout inf ended in an OverflowError traceback
    (["--timeout", "inf"], "argument --timeout: expected seconds, a finite number > 0"),
    (["--timeout", "1e300"], "argument --timeout: expected seconds"),
    (["--timeout", "0"], "argument --timeout"),
    (["--world", "0"], "argument --world: expected an integer >= 1"),
    (["--heads", "2.5"], "argument --heads: expected an integer >= 1"),
    (["--tokens", "abc"], "argument --tokens: expected an integer >= 1"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0"),
    (["--lengths", "1", "--tokens", "5"], "not allowed with argument"),
    (["--backend", "nope"], "invalid choice"),
    (["--dtype", "int8"], "invalid choice"),
    (["--inject", "zero"], "invalid choice"),
])
def test_bad_options_exit_2_naming_the_problem(argv, message, capsys):
    """Bad input must stop the check before any rank starts, with status 2, no traceback, and a message naming
    the option and what it allows."""
    assert _status(["check", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_negative_window_needs_no_equals_sign():
    """``--window -1,3`` was taken for an unknown option by argparse ("expected one argument"): the window
    must parse as written, for check as for plan."""
    parser = argparse.ArgumentParser()
    cli.add_check_parser(parser.add_subparsers())
    args = parser.parse_args(cli.attach_negative_values(["check", "--window", "-1,3", "--seed", "-0"]))
    assert args.window == (-1, 3)
    assert {c.window_size for c in cli._cases(args, 2)} == {(-1, 3)}
    assert cli.attach_negative_values(["--window", "-1,-1", "--lengths", "5"]) == ["--window=-1,-1", "--lengths", "5"]
    assert cli.attach_negative_values(["--heads", "-1"]) == ["--heads", "-1"]  # a plain number: argparse's own


def test_shared_integer_list_parser():
    """One parser reads every comma-separated option (check, plan; benchmarks reuse it): commas and spaces,
    a count, a minimum, and an error that says what was expected and what was got."""
    assert cli.parse_ints("4096,97 1\n0", what="lengths", minimum=0) == (4096, 97, 1, 0)
    assert cli.parse_ints("-1,3", what="a window", minimum=-1, count=2) == (-1, 3)
    for text, kwargs in (("1,2,3", {"count": 2}), ("", {}), ("1,x", {}), ("-2", {"minimum": -1}), ("1.5", {})):
        with pytest.raises(ValueError, match=r"expected a thing; got '"):
            cli.parse_ints(text, what="a thing", **kwargs)


def test_help_lists_the_commands_and_every_option_says_its_default(capsys):
    """``--help`` showed the commands as ``{check,plan}`` under an rST-quoted description; every option must
    have help text saying its default (or that it is required)."""
    assert _status(["--help"]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "plan" in out and "``" not in out
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.add_check_parser(sub)
    planview.add_plan_parser(sub)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
                assert action.required or "default" in action.help, (name, action.help)


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
    _launched_as_one_rank(monkeypatch)
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



def _poisoned(inject: str, ring: int, reference: int) -> checking.Result:
    """A float64 result whose every quantity has ``ring`` NaN/Inf in the ring's result and ``reference`` in the
    reference's, at the same entries where both have them; every finite entry exact."""
    names = checking.GRAD_NAMES
    both = min(ring, reference)
    return checking.Result(Case(lengths=(8,), inject=inject), errors=dict.fromkeys(names, 0.0),
                           nonfinite=dict.fromkeys(names, ring), hidden=dict.fromkeys(names, reference - both),
                           leaked=dict.fromkeys(names, ring - both))


def test_nan_where_none_was_injected_fails_even_where_both_agree():
    """``check --softcap inf`` reported every case ok with error 0: every output and the reference were NaN at
    the same entries, so nothing was hidden or leaked and the error over no finite entry was 0. A NaN/Inf in
    the ring's result or the reference fails the case unless --inject asked for it."""
    reason = checking._judge(_poisoned("", 40, 40))
    assert reason == "40 NaN/Inf in out of the ring, 40 in the reference; none was injected"
    assert checking._judge(_poisoned("", 0, 3)).startswith("0 NaN/Inf in out of the ring, 3 in the reference")
    assert checking._judge(_poisoned("nan", 40, 40)) == ""  # asked for, and it propagated
    assert checking._judge(_poisoned("", 0, 0)) == ""


@pytest.mark.parametrize("lengths", [(0,), (0, 0), (0, 5, 0)])
def test_empty_pack_passes(lengths):
    """``check --lengths 0`` crashed in the check's own float64 reference (no token, so no gradient to take):
    an empty pack, or empty documents, are valid input and must pass."""
    for strategy in ("balanced", "zigzag"):
        result = run_case(Case(lengths=lengths, strategy=strategy))
        assert result.ok, result.reason


def _launched_as_one_rank(monkeypatch) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port()), "RINGPACK_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)


def test_empty_pack_under_a_launcher_exits_0(monkeypatch, capsys):
    """The same through the command line, as a launched rank: status 0 and every case ok."""
    _launched_as_one_rank(monkeypatch)
    argv = ["check", "--lengths", "0,0", "--strategy", "zigzag", "--causal", "--window", "-1,-1", "--heads", "2"]
    assert main(argv) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out


def test_bad_local_rank_under_a_launcher_exits_2(monkeypatch, capsys):
    """LOCAL_RANK=abc was an int() traceback: the check exits 2 naming the variable."""
    _launched_as_one_rank(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "abc")
    assert main(["check", "--lengths", "5"]) == 2
    assert "environment variable LOCAL_RANK must be an integer >= 0, got 'abc'" in capsys.readouterr().err


def test_table_has_one_error_column_per_quantity_and_the_nan_counts():
    """The table printed one max error over all quantities and no NaN/Inf count (only --json had them); the
    README promises a column per quantity. An injected case shows '-' for the gradients it does not compare."""
    result = run_case(Case(lengths=MIX, inject="nan", strategy="zigzag"))
    width = len(result.case.label)
    header, row = cli._header(12, width).splitlines()[0], cli._row(3, 12, result, width)
    assert header.split()[1:11] == ["out", "lse", "dq", "dk", "dv", "1-dev", "ratio", "nan/inf", "ring", "ms"]
    cells = row[len(f"[ 3/12] {result.case.label}"):].split()
    assert cells[0] == f"{result.errors['out']:.1e}" and cells[1] == f"{result.errors['lse']:.1e}"
    assert cells[2:5] == ["-", "-", "-"]
    ring = result.nonfinite["out"] + result.nonfinite["lse"]  # the compared quantities: the ring's and the reference's
    assert ring > 0 and cells[7] == f"{ring}/{result.reference_nonfinite('out') + result.reference_nonfinite('lse')}"
    assert cells[-1] == "ok"
    labels = [c.label for c in cli._cases(_args("--tokens", "131072", "--dtype", "bfloat16"), 8)]
    assert max(map(len, cli._header(36, max(map(len, labels))).splitlines())) <= 140  # a 140-column terminal


def test_progress_names_each_phase_and_the_reference_fraction():
    """A long case printed nothing for minutes: run_case reports its phases, and the reference how far it got."""
    heard = []
    run_case(Case(lengths=(300, 40), heads=2, kv_heads=1), progress=lambda *event: heard.append(event))
    phases = [phase for phase, _ in heard]
    assert phases[0] == "reference" and phases[-2:] == ["ring", "one device"]
    fractions = [f for phase, f in heard if phase == "reference"]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0


def test_progress_prints_a_line_every_interval_and_none_for_a_short_case():
    """The heartbeat: a line per interval while a case runs, saying the phase and fraction; nothing when the case
    ends first (a line per block would flood the terminal)."""
    stream = io.StringIO()
    with cli.Progress("[1/1] long case", interval=0.05, stream=stream) as progress:
        progress("reference", 0.25)
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 7 and all(line.strip().startswith("[1/1] long case: reference 25%") for line in lines)
    quiet = io.StringIO()
    with cli.Progress("[1/1] short case", interval=60, stream=quiet):
        pass
    assert quiet.getvalue() == ""


def test_check_warms_every_configuration_of_its_cases_once():
    """On a GPU ``check`` compiles its kernels before the first case (its time would hide FA4's compilation): one
    warmup per distinct head layout, dtype, mask and softcap of the suite."""
    from ringpack import cli
    from ringpack.checking import default_cases
    cases = default_cases(2)[::5]
    seconds, configs = cli.warm_up(cases, "reference", torch.device("cpu"))
    assert configs == len({(c.heads, c.kv_heads, c.head_dim, c.dtype, c.causal, c.window_size, c.softcap)
                           for c in cases}) > 1 and seconds >= 0
