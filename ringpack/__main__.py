"""``python -m ringpack check | plan``: the distributed exactness check and the plan inspector."""

from __future__ import annotations

import argparse
import sys

from ringpack import cli, planview


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringpack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_check_parser(sub)
    planview.add_plan_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
