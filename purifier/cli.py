"""The ``purifier`` command. Each subcommand lives in ``purifier.commands.<module>``,
which defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; this file
only dispatches, and imports a subcommand's module (and torch) only when it runs.

Errors raised on purpose (:class:`purifier.errors.PurifierError`) are caught here, once for
every command, and printed as one line with a hint (exit status 2); anything else is a bug
and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PurifierError

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
    try:
        return int(args._module.run(args) or 0)
    except PurifierError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"purifier {chosen}: error: {message} (hint: {hint(exc, chosen)})", file=sys.stderr)
        return 2


def hint(exc: Exception, command: str) -> str:
    """What to try next, by kind of error."""
    from .errors import DataError, DownstreamError, ModelLoadError

    if isinstance(exc, ModelLoadError):
        where = "--model-dir DIR or PURIFIER_MODEL_DIR" if command.startswith("serve") else "the model directory"
        return (f"check {where}: a folder with generator.safetensors (and classifier/encoder) and "
                "card.json, as written by `purifier train-*`")
    if isinstance(exc, DataError):
        return ("check the data named: --data PATH (a folder of images, .npy/.npz, IDX; docs/your-data.md), "
                "or --data-dir DIR / PURIFIER_DATA_DIR for the folder with the IDX files")
    if isinstance(exc, DownstreamError):
        return "check that the downstream classifier server is up and reachable"
    return f"see `purifier {command} --help`"


if __name__ == "__main__":
    sys.exit(main())
