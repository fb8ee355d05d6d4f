"""The ringpack command line: ``python -m ringpack check`` and ``python -m ringpack plan``."""

from __future__ import annotations

import argparse
import sys

from ringpack import cli, planview

DESCRIPTION = """\
ringpack: exact context-parallel (ring) attention over packed variable-length sequences.

commands:
  check   run ring attention on every rank against a float64 reference (the check to run before a long job)
  plan    show how a pack is split across ranks and what each ring step computes and sends

'python -m ringpack COMMAND --help' lists a command's options. Exit status: 0 success, 1 a failed check,
2 bad input."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringpack", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    cli.add_check_parser(sub)
    planview.add_plan_parser(sub)
    args = parser.parse_args(cli.attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
