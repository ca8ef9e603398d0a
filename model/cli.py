"""The ``psn`` console script: ``psn train ...`` (more subcommands may join it)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: psn {train} ...\n  train   train a PSN-family network and write a model folder (psn train -h)"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # a usage error: the usage goes to stderr, as for an unknown command
        print(USAGE, file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "train":
        from model.train import main as train_main

        return train_main(rest)
    print(f"psn: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
