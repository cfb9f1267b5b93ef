"""``koopman-search storage-proxy``: Optuna's gRPC storage proxy in front of a study's database."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from koopman_search.search.cli._common import STORAGE_ENV
from koopman_search.trainer.errors import ConfigError

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  koopman-search storage-proxy --storage postgresql+psycopg://koopman:PASS@db:5432/koopman --host 0.0.0.0
  koopman-search worker studies/wikitext2.toml --storage grpc://proxy-host:13000 --gpus all

Workers that use --storage grpc://HOST:PORT (or OPTUNA_STORAGE) send every storage call, heartbeats
included, through this one process, and only it connects to the database (at most --threads connections
in use at a time). It also fails trials whose heartbeat went stale and queues their retries. Run `create`,
`status`, `report` and the dashboard against the database itself. The proxy has no TLS and no password of
its own: keep it on a private network. It prints one line, `listening on grpc://HOST:PORT`, on stdout.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "storage-proxy",
        help="serve a study database to many workers over gRPC (Optuna's GrpcStorageProxy)",
        description="Serve the study database to workers over gRPC, so that many workers share a few "
        "database connections. Needs the grpc extra: pip install 'koopman-search[grpc]'.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help=f"the database, e.g. postgresql+psycopg://user:pass@host/db (default: ${STORAGE_ENV})",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every one)",
    )
    parser.add_argument("--port", type=int, default=13000, help="port (default: 13000; 0 picks a free one)")
    parser.add_argument(
        "--threads",
        type=int,
        default=16,
        help="requests served at a time, so database connections in use (default: 16)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.storage.proxy import is_proxy_url, serve
    from koopman_search.search.studyfile.urls import redact_url

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, but got port={args.port}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, but got threads={args.threads}")
    url = args.storage or os.environ.get(STORAGE_ENV)
    if not url:
        raise ConfigError(f"storage-proxy needs the database: give --storage URL or set ${STORAGE_ENV}")
    if is_proxy_url(url):
        raise ConfigError(
            f"storage-proxy serves a database, not another proxy, but got storage={redact_url(url)!r}; "
            "give it the postgresql+psycopg:// URL"
        )
    if url.startswith("sqlite"):
        logger.warning("serving SQLite through the proxy: fine for a try, but use PostgreSQL for many workers")

    def ready(port: int) -> None:
        print(f"listening on grpc://{args.host}:{port}", flush=True)
        sys.stdout.flush()

    return serve(url, host=args.host, port=args.port, threads=args.threads, ready=ready)
