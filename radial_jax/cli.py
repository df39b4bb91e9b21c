"""The ``radial-jax`` command: one subcommand per job (``radial-jax --help`` lists them).

Feature packages contribute subcommands through a ``register(subparsers)``
function in their own ``cli`` module, listed in ``COMMAND_MODULES``. A bad input
(``ValueError``, ``CheckpointError``, a missing file) ends the command with a one-line
``radial-jax <command>: error: ...`` on stderr and exit status 2, as argparse does for bad flags.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# transformers' "PyTorch was not found" advice is noise for a JAX tool; read when transformers is imported
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

COMMAND_MODULES = (
    "radial_jax.pipeline",
    "radial_jax.training.plan",
    "radial_jax.profiling.cli",
    "radial_jax.serving.cli",
    "radial_jax.training.cli",
)
# CheckpointError is a ValueError; an ImportError is a missing optional dependency (its message names the
# extra to install, e.g. torch for a GGUF file's tokenizer)
# FloatingPointError: training's NonFiniteLossError, which stops at the bad step with the last good checkpoint
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ImportError, FloatingPointError)


def _version() -> str:
    from radial_jax.version import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radial-jax", description="Radial Networks in JAX: profile, simulate, route, distil, train, generate.")
    parser.add_argument("--version", action="version", version=f"radial-jax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module: show it
                raise
            continue
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        # the message names the file or flag; the traceback would only bury it
        print(f"radial-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
