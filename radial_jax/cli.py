"""The ``radial-jax`` command: one subcommand per job (``radial-jax --help`` lists them).

Feature packages contribute subcommands through a ``register(subparsers)``
function in their own ``cli`` module, listed in ``COMMAND_MODULES``. Exit status:

* 2, a bad input: a ``ValueError`` raised by radial_jax's own checks (``CheckpointError`` included), a missing
  file or directory, a missing optional dependency, or training stopped at a NaN (the last good checkpoint
  kept): one line, ``radial-jax <command>: error: ...``, as argparse says a bad flag;
* 1, anything else, a ``ValueError`` raised inside jax or numpy included: a bug, printed with its traceback
  and a line saying so, so that it can be reported.

Every command keeps JAX's persistent compilation cache (``use_compile_cache``): a program compiled by one run
is read back by the next, so a rerun skips most of the compile time.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

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


PACKAGE_DIR = Path(__file__).resolve().parent
COMPILE_CACHE_ENV = "RADIAL_JAX_COMPILE_CACHE"  # the cache's folder, or "off"
COMPILE_CACHE_MIN_SECONDS = 0.5  # programs that compile faster than this are not worth a file


def use_compile_cache(setting: Optional[str] = None) -> Optional[Path]:
    """Turn on JAX's persistent compilation cache; returns its folder, or None when it is off.

    ``setting`` (default: the ``RADIAL_JAX_COMPILE_CACHE`` environment variable): a folder, ``"off"``, or empty
    for ``<radial_jax cache>/xla`` (``radial_jax.data.corpus.CACHE_DIR``, itself moved by ``RADIAL_JAX_CACHE``).
    """
    import jax
    from radial_jax.data import corpus
    setting = os.environ.get(COMPILE_CACHE_ENV, "") if setting is None else setting
    if setting.strip().lower() == "off":
        return None
    folder = Path(setting).expanduser() if setting.strip() else corpus.CACHE_DIR / "xla"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)
    return folder


def is_usage_error(e: BaseException) -> bool:
    """Whether ``e`` says the input was bad (exit 2, one line) rather than that radial_jax has a bug (exit 1)."""
    if not isinstance(e, USER_ERRORS):
        return False
    if type(e).__module__.startswith("radial_jax") or not isinstance(e, ValueError):
        return True  # CheckpointError and the other errors of ours; missing files and dependencies; a NaN stop
    frames = traceback.extract_tb(e.__traceback__)
    raised_in = Path(frames[-1].filename).resolve() if frames else None
    return raised_in is not None and PACKAGE_DIR in raised_in.parents  # raised by our own checks


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
    # every subcommand's --help: its one-line summary as the description, and each flag's default
    summaries = {action.dest: action.help for action in sub._choices_actions}  # noqa: SLF001 - argparse's own list
    for name, command in sub.choices.items():
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
        command.description = command.description or summaries.get(name)
        for action in command._actions:  # noqa: SLF001 - a flag with no help still shows its default
            if action.help is None and action.default not in (None, argparse.SUPPRESS) and action.option_strings:
                action.help = "(default: %(default)s)"
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    use_compile_cache()
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - every error ends here, classified
        if is_usage_error(e):  # the message names the file or flag; the traceback would only bury it
            print(f"radial-jax {args.command}: error: {e}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"radial-jax {args.command}: internal error ({type(e).__name__}), a bug in radial_jax or a library it "
              "uses: please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
