"""URLs and paths in study files: ``${VAR}`` expansion, storage and artifact-store resolution, redaction.

A study file may name its storage with environment variables (``postgresql+psycopg://user:${PASSWORD}@db/ks``)
and relative paths (``sqlite:///runs/x.db`` next to the file). This module turns those into the absolute
URL and location that every process uses, and shows a URL anywhere (logs, errors) only through
:func:`redact_url`, so that a password never leaves the process. It depends on nothing of the search but its
errors, so that both the study-file parser (:mod:`search.studyfile.spec`) and the storage
(:mod:`search.storage.database`) import it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from urllib.parse import quote

from koopman_search.search.errors import SpecError

__all__ = [
    "STORAGE_BACKENDS",
    "expand_env",
    "redact_text",
    "redact_url",
    "resolve_artifacts",
    "resolve_path",
    "resolve_storage_url",
]

logger = logging.getLogger(__name__)

# Optuna's RDB storage backends; postgresql+psycopg for many workers
STORAGE_BACKENDS = ("sqlite", "postgresql", "mysql")
STORAGE_EXAMPLE = "sqlite:///study.db or postgresql+psycopg://user:${PASSWORD}@host:5432/db"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)@")


# A query parameter that carries a secret: libpq's password and sslpassword, and any other *pass* key.
_SECRET_QUERY = re.compile(r"([?&][^=&#]*pass[^=&#]*=)([^&#]*)", re.IGNORECASE)


def _query_secrets(url: str) -> list[str]:
    """The values of the secret query parameters of ``url`` (``?password=...``, ``&sslpassword=...``)."""
    return [m.group(2) for m in _SECRET_QUERY.finditer(url) if m.group(2)]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, in the userinfo and in the query string (also for strings
    SQLAlchemy cannot parse)."""
    return _SECRET_QUERY.sub(lambda m: m.group(1) + ("***" if m.group(2) else ""), _redact_userinfo(url))


def _redact_userinfo(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    scheme, sep, rest = url.partition("://")
    netloc = rest.split("/", 1)[0] if sep else ""
    if netloc.count("@") > 1:  # an unencoded '@' in the password: everything before the last '@' is userinfo
        user = netloc.rsplit("@", 1)[0].split(":", 1)[0]
        return f"{scheme}://{user}:***@{rest[len(netloc.rsplit('@', 1)[0]) + 1 :]}"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        return re.sub(r"^([^:/]*://[^:@/]*:).*@", r"\1***@", url)
    if parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)


def redact_text(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (if any) replaced by ``***``."""
    import sqlalchemy

    text = text.replace(url, redact_url(url))
    for secret in _query_secrets(url):
        text = text.replace(secret, "***")
    _scheme, sep, rest = url.partition("://")
    netloc = rest.split("/", 1)[0] if sep else ""
    if netloc.count("@") > 1:  # an unencoded '@' in the password: the userinfo runs to the last '@'
        password: str | None = netloc.rsplit("@", 1)[0].partition(":")[2] or None
    else:
        try:
            password = sqlalchemy.engine.make_url(url).password
        except (sqlalchemy.exc.ArgumentError, ValueError):
            return text
    if password:
        text = text.replace(str(password), "***")
    return text


def expand_env(template: str, origin: str, key: str, in_url: bool = False) -> str:
    """Replace every ``${VAR}`` with the environment's value. In a URL, values inside ``user:password@`` are
    percent-encoded, so the variable holds the raw password."""
    userinfo = _USERINFO.match(template) if in_url else None

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise SpecError.at(
                f"environment variable {name} is not set, but {key.rsplit('.', 1)[-1]} uses ${{{name}}}; "
                "export it or edit the file",
                origin,
                key,
            )
        text = os.environ[name]
        if userinfo is not None and match.start() < userinfo.end(1):
            return quote(text, safe="")
        return text

    expanded = _VAR.sub(value, template)
    leftover = _VAR.sub("", template)
    if "${" in leftover:
        shown = redact_url(template) if in_url else template
        raise SpecError.at(
            f"${{...}} must name a variable like ${{POSTGRES_PASSWORD}}, but got {key.rsplit('.', 1)[-1]}={shown!r}",
            origin,
            key,
        )
    return expanded


def resolve_storage_url(template: str, name: str, origin: str, base_dir: Path) -> str:
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    key = "study.storage"
    if not template:
        return URL.create("sqlite", database=resolve_path(base_dir, f"{name}.db")).render_as_string(hide_password=False)
    raw = expand_env(template, origin, key, in_url=True)
    shown = redact_url(raw)
    if raw.startswith("grpc://"):  # workers behind `koopman-search storage-proxy` (search/storage/proxy.py)
        host, _, port = raw.removeprefix("grpc://").rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise SpecError.at(
                f"a storage proxy URL must look like grpc://HOST:PORT, but got storage={shown!r}", origin, key
            )
        return raw
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise SpecError.at(
            f"storage must be a database URL like {STORAGE_EXAMPLE}, but got storage={shown!r}", origin, key
        ) from None
    backend = url.get_backend_name()
    if backend not in STORAGE_BACKENDS:
        raise SpecError.at(
            f"storage must use one of {', '.join(STORAGE_BACKENDS)} (e.g. {STORAGE_EXAMPLE}), "
            f"but got storage={shown!r}",
            origin,
            key,
        )
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise SpecError.at(
            f"storage names an unknown database driver {url.drivername!r}; use e.g. postgresql+psycopg, "
            f"but got storage={shown!r}",
            origin,
            key,
        ) from None
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise SpecError.at(
                "storage must name a SQLite file (an in-memory database is gone when the process ends), "
                f"but got storage={shown!r}",
                origin,
                key,
            )
        url = url.set(database=resolve_path(base_dir, url.database))
    elif not url.database:
        raise SpecError.at(
            f"storage must name a database (…/DBNAME at the end), but got storage={shown!r}", origin, key
        )
    userinfo = _USERINFO.match(template)
    if url.password is not None and userinfo is not None and "${" not in userinfo.group(1):
        logger.warning(
            "the storage URL in %s holds a literal password; put it in an environment variable, e.g. "
            "postgresql+psycopg://user:${POSTGRES_PASSWORD}@host/db",
            origin,
        )
    return url.render_as_string(hide_password=False)


def resolve_artifacts(template: str, name: str, origin: str, base_dir: Path) -> str:
    if not template:
        return resolve_path(base_dir, f"{name}-artifacts")
    value = expand_env(template, origin, "study.artifacts")
    if "://" in value:
        if not value.startswith("s3://") or len(value) <= len("s3://"):
            raise SpecError.at(
                f"artifacts must be a directory or an s3://bucket/prefix URL, but got artifacts={value!r}",
                origin,
                "study.artifacts",
            )
        return value
    return resolve_path(base_dir, value)


def resolve_path(base_dir: Path, path: str) -> str:
    """``path`` made absolute against the study file's folder (``~`` expanded, ``..`` collapsed)."""
    return os.path.normpath(base_dir / Path(path).expanduser())
