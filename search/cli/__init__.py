"""The ``koopman-search`` command line.

Data goes to stdout, logs to stderr. Exit codes: 0 success, 1 runtime error, 2 usage or input error.
A traceback is printed only with ``--debug``. Each subcommand lives in its own module exposing
``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from koopman_search.search.settings import RuntimeSettings, configure_logging, configured
from koopman_search.trainer.errors import ConfigError, DataError, KoopmanError

__all__ = ["COMMANDS", "build_parser", "main"]

logger = logging.getLogger(__name__)

# subcommand name -> module under koopman_search.search.cli
COMMANDS: dict[str, str] = {
    "train": "koopman_search.search.cli.train",
    "create": "koopman_search.search.cli.create",
    "launch": "koopman_search.search.cli.launch",
    "worker": "koopman_search.search.cli.worker",
    "status": "koopman_search.search.cli.status",
    "best": "koopman_search.search.cli.best",
    "dashboard": "koopman_search.search.cli.dashboard",
    "report": "koopman_search.search.cli.report",
    "recommend": "koopman_search.search.cli.recommend",
    "storage-proxy": "koopman_search.search.cli.storage_proxy",
}


def _modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(path) for name, path in COMMANDS.items()}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("koopman-search")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koopman-search",
        description="Hyperparameter search for hybrid Koopman language-model training.",
        epilog="Example: koopman-search launch studies/quickstart.toml",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _modules().items():
        command = module.add_parser(sub)
        command.set_defaults(_run=module.run, _name=name)
    return parser


def _configure_logging(debug: bool, quiet: bool, command: str) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    # the study commands show Optuna's own lines in the same format as ours; train has none
    configure_logging(level, None if command == "train" else logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug, args.quiet, args._name)
    try:
        # the KOOPMAN_* settings, read once: a bad one stops here, before anything is touched
        with configured(RuntimeSettings.from_environment()):
            return int(args._run(args) or 0)
    except (ConfigError, DataError) as exc:  # bad input: a value, a file, a corpus
        if args.debug:
            raise
        print(f"koopman-search {args._name}: error: {exc}", file=sys.stderr)
        return 2
    except KoopmanError as exc:
        if args.debug:
            raise
        print(f"koopman-search {args._name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"koopman-search {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
