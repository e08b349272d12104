"""The ``purifier`` command. Each subcommand lives in ``purifier.commands.<module>``,
which defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; this file
only dispatches, and imports a subcommand's module (and torch) only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under purifier.commands
COMMANDS = {
    "train-gan": "train_gan",
    "train-classifier": "train_classifier",
    "train-encoder": "train_encoder",
    "purify": "purify",
    "serve": "serve",
    "serve-classifier": "serve_classifier",
    "eval": "evaluate",
    "calibrate": "calibrate",
    "bench": "bench",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purifier", description="Defense-GAN input purification")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name)  # listed, arguments parsed only for the command that runs
            continue
        module = importlib.import_module(f"purifier.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in COMMANDS:
        parser = argparse.ArgumentParser(prog="purifier", description="Defense-GAN input purification")
        parser.add_argument("command", choices=sorted(COMMANDS), help="subcommand; see purifier COMMAND --help")
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    args = build_parser(only=chosen).parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
