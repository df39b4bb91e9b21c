"""The ``radial-jax`` command: one subcommand per job (``radial-jax --help`` lists them).

Feature packages contribute subcommands through a ``register(subparsers)``
function in their own ``cli`` module, listed in ``COMMAND_MODULES``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "radial_jax.pipeline",
    "radial_jax.plan",
    "radial_jax.profiling.cli",
    "radial_jax.training.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radial-jax", description="Radial Networks in JAX: profile, simulate, route, distil, train.")
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
