"""docker-compose.yml, docker/Dockerfile and .env.example, checked without a Docker engine.

The Compose file is validated against the Compose Specification's JSON schema (vendored in tests/data, see
its README), after the same ``${VAR}`` interpolation that Compose applies, with the values of .env.example.
Every koopman-search command that it runs is parsed by the real CLI parser.
"""

from __future__ import annotations

import copy
import json
import posixpath
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from sqlalchemy.engine import make_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / ".env.example"
SCHEMA_FILE = Path(__file__).parent / "data" / "compose-spec.json"

# The schema declares "http://json-schema.org/draft/2019-09/schema#", a spelling that jsonschema does not map
# to a draft (it would fall back to the newest one with a warning), so the draft is named here.
SchemaValidator = jsonschema.Draft201909Validator

# The user's slowest epoch with the Koopman loss on (docs/design.md, "The user's setup"): a stopping worker
# must be given at least this long to finish the epoch and checkpoint it.
SLOWEST_EPOCH_S = 96

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
KOOPMAN_IMAGE: str = COMPOSE["x-koopman"]["image"]
# The services that run koopman-search: those on the project's image, whose entrypoint is koopman-search.
KOOPMAN_SERVICES = sorted(name for name, s in COMPOSE["services"].items() if s.get("image") == KOOPMAN_IMAGE)

# Compose interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error},
# ${VAR:+alternative}, ${VAR+alternative}.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_ENV_LINE = re.compile(r"(?P<comment>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class UnsetVariableError(LookupError):
    """A variable without a default that the environment does not set."""


def _strings(value: Any) -> Iterator[str]:
    """Every string value in a loaded YAML document (keys are not interpolated by Compose)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _references(document: Any) -> dict[str, set[str]]:
    """Variable name -> the operators it is used with ("" for a plain ${VAR})."""
    found: dict[str, set[str]] = {}
    for text in _strings(document):
        for match in _VARIABLE.finditer(text):
            name = match["braced"] or match["named"]
            if name:
                found.setdefault(name, set()).add(match["op"] or "")
    return found


def _substitute(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"] or "", match["arg"] or ""
        value = env.get(name)
        missing = value is None or (value == "" and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if missing else str(value)
        if op in ("+", ":+"):
            return "" if missing else arg
        if missing and op in ("?", ":?"):
            raise UnsetVariableError(f"{name}: {arg}")
        if value is None:  # Compose would substitute "" with a warning; here it is an error
            raise UnsetVariableError(f"{name} is not set and has no default")
        return value

    return _VARIABLE.sub(replace, text)


def interpolate(document: Any, env: Mapping[str, str]) -> Any:
    """A copy of a loaded Compose document with every variable substituted, as Compose does."""
    if isinstance(document, str):
        return _substitute(document, env)
    if isinstance(document, Mapping):
        return {key: interpolate(value, env) for key, value in document.items()}
    if isinstance(document, list):
        return [interpolate(item, env) for item in document]
    return document


def _env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(settings, commented settings) of .env.example; a commented one shows a default."""
    settings: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = _ENV_LINE.fullmatch(line.strip())
        if match:
            target = commented if match["comment"] else settings
            target[match["name"]] = match["value"].strip().strip("'\"")
    return settings, commented


def _seconds(duration: str) -> float:
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Compose duration: {duration!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _option(command: list[str], flag: str) -> str:
    """The value after ``flag`` in an argument list."""
    return command[command.index(flag) + 1]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return _env_example()[0]


@pytest.fixture(scope="module")
def compose(env: dict[str, str]) -> dict[str, Any]:
    """The Compose file as Compose sees it with a .env copied from .env.example."""
    return interpolate(COMPOSE, env)


def _schema_errors(document: Any, schema: dict[str, Any]) -> list[str]:
    errors = SchemaValidator(schema).iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


# --- the schema check ---------------------------------------------------------------------------------


def test_vendored_schema_is_a_valid_2019_09_compose_schema(schema: dict[str, Any]) -> None:
    SchemaValidator.check_schema(schema)
    assert schema["title"] == "Compose Specification"


def test_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any], schema: dict[str, Any]
) -> None:
    assert _schema_errors(compose, schema) == []


def _devices_as_string(doc: dict[str, Any]) -> None:
    doc["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] = "nvidia"


def _restart_unquoted_no(doc: dict[str, Any]) -> None:
    doc["services"]["create"]["restart"] = yaml.safe_load("no")  # what a bare `restart: no` loads as


def _misspelled_key(doc: dict[str, Any]) -> None:
    doc["services"]["worker"]["depends-on"] = doc["services"]["worker"].pop("depends_on")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_devices_as_string, r"'nvidia' is not of type 'array'"),
        (_restart_unquoted_no, r"False is not of type 'string'"),
        (_misspelled_key, r"'depends-on' does not match any of the regexes"),
    ],
    ids=["devices-as-string", "restart-unquoted-no", "misspelled-key"],
)
def test_schema_check_rejects_a_broken_copy(
    compose: dict[str, Any], schema: dict[str, Any], mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    broken = copy.deepcopy(compose)
    mutate(broken)
    errors = _schema_errors(broken, schema)
    assert any(re.search(message, error) for error in errors), errors


# --- postgres -----------------------------------------------------------------------------------------


def test_postgres_has_a_pg_isready_healthcheck_for_its_own_user_and_database(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    check = postgres["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"]
    assert f"--username={postgres['environment']['POSTGRES_USER']}" in check
    assert f"--dbname={postgres['environment']['POSTGRES_DB']}" in check


def test_postgres_keeps_its_data_in_a_named_volume(compose: dict[str, Any]) -> None:
    mounts = compose["services"]["postgres"]["volumes"]
    data = [m for m in mounts if m["target"] == "/var/lib/postgresql/data"]
    assert len(data) == 1 and data[0]["type"] == "volume"
    assert data[0]["source"] in compose["volumes"]


def test_every_published_port_binds_127_0_0_1_only(compose: dict[str, Any]) -> None:
    ports = {name: s.get("ports", []) for name, s in compose["services"].items()}
    assert ports["postgres"] and ports["dashboard"]
    exposed = [(name, p) for name, ps in ports.items() for p in ps if not str(p).startswith("127.0.0.1:")]
    assert exposed == []


def test_postgres_password_comes_only_from_the_env_file(env: dict[str, str]) -> None:
    postgres_env = COMPOSE["services"]["postgres"]["environment"]
    assert _references(postgres_env["POSTGRES_PASSWORD"]) == {"POSTGRES_PASSWORD": {":?"}}
    without = {name: value for name, value in env.items() if name != "POSTGRES_PASSWORD"}
    with pytest.raises(UnsetVariableError, match=r"POSTGRES_PASSWORD: set POSTGRES_PASSWORD in \.env"):
        interpolate(COMPOSE["services"]["postgres"], without)
    assert env["POSTGRES_PASSWORD"] not in COMPOSE_FILE.read_text(encoding="utf-8")


def test_storage_url_names_the_postgres_service_user_database_and_password(env: dict[str, str]) -> None:
    password = "s3cret-pass_word.1"
    compose = interpolate(COMPOSE, {**env, "POSTGRES_PASSWORD": password})
    postgres_env = compose["services"]["postgres"]["environment"]
    for name in KOOPMAN_SERVICES:
        url = make_url(compose["services"][name]["environment"]["OPTUNA_STORAGE"])
        assert url.drivername == "postgresql+psycopg"
        assert (url.host, url.port) == ("postgres", 5432)
        assert url.username == postgres_env["POSTGRES_USER"]
        assert url.password == password
        assert url.database == postgres_env["POSTGRES_DB"]


# --- workers, study creation, dashboard ---------------------------------------------------------------


def test_worker_reserves_exactly_one_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_create_runs_once_after_postgres_is_healthy_and_workers_wait_for_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["create"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["create"]["restart"] == "no"
    for name in ("worker", "dashboard"):
        assert services[name]["depends_on"] == {"create": {"condition": "service_completed_successfully"}}


def test_worker_restarts_on_failure_and_gets_time_to_checkpoint_an_epoch(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert worker["restart"] == "on-failure"
    assert _seconds(worker["stop_grace_period"]) > SLOWEST_EPOCH_S


def test_create_worker_and_dashboard_share_the_artifact_volume(compose: dict[str, Any]) -> None:
    targets = set()
    for name in ("create", "worker", "dashboard"):
        service = compose["services"][name]
        mounts = [m for m in service["volumes"] if m["type"] == "volume" and m["source"] == "artifacts"]
        assert len(mounts) == 1, name
        target = mounts[0]["target"]
        assert _option(service["command"], "--artifacts") == target, name
        assert service["environment"]["KOOPMAN_ARTIFACTS"] == target, name
        targets.add(target)
    assert len(targets) == 1
    assert "artifacts" in compose["volumes"]


def test_dashboard_listens_on_127_0_0_1_port_8080_of_the_host(compose: dict[str, Any]) -> None:
    dashboard = compose["services"]["dashboard"]
    assert dashboard["ports"] == ["127.0.0.1:8080:8080"]
    assert _option(dashboard["command"], "--port") == "8080"
    assert _option(dashboard["command"], "--host") == "0.0.0.0"  # inside the container only


def test_data_and_study_paths_mirror_the_checkout(compose: dict[str, Any]) -> None:
    workdirs = [args for instruction, args in _dockerfile_instructions() if instruction == "WORKDIR"]
    assert workdirs == ["/app"]
    sources = [m["source"] for m in COMPOSE["x-koopman"]["volumes"] if "WIKITEXT2_DIR" in m["source"]]
    assert len(sources) == 1
    data_default = re.fullmatch(r"\$\{WIKITEXT2_DIR:-(.+)\}", sources[0])
    assert data_default is not None
    # <repo>/<default> on the host is the WikiText-2 copy; /app/<default> in the container is the mount.
    assert (REPO / data_default[1]).resolve() == (REPO.parent / "shared" / "data" / "wikitext-2").resolve()
    for name in KOOPMAN_SERVICES:
        mounts = {m["target"]: m for m in compose["services"][name]["volumes"]}
        data = mounts[posixpath.normpath(posixpath.join("/app", data_default[1]))]
        assert data["type"] == "bind" and data["read_only"] is True
        studies = mounts["/app/studies"]
        assert studies["source"] == "./studies" and studies["read_only"] is True
        # the study files' hf: source is replaced by the mounted copy
        assert compose["services"][name]["environment"]["KOOPMAN_DATA_SOURCE"] == f"files:{data['target']}"


def test_study_file_used_by_the_services_exists(compose: dict[str, Any]) -> None:
    for name in ("create", "worker"):
        study = compose["services"][name]["command"][1]
        assert study.startswith("studies/") and (REPO / study).is_file(), (name, study)


# --- the commands, against the real CLI parser --------------------------------------------------------


def test_koopman_search_services_run_the_image_entrypoint() -> None:
    assert {"create", "worker", "dashboard"} <= set(KOOPMAN_SERVICES)
    assert [name for name in KOOPMAN_SERVICES if "entrypoint" in COMPOSE["services"][name]] == []


@pytest.mark.parametrize("service", KOOPMAN_SERVICES)
def test_service_command_parses_with_the_real_cli(
    compose: dict[str, Any], service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from koopman_search.search.cli import build_parser

    command = compose["services"][service]["command"]
    assert isinstance(command, list) and all(isinstance(arg, str) for arg in command)
    try:
        args = build_parser().parse_args(command)
    except SystemExit as exc:
        pytest.fail(f"koopman-search rejects {command} (exit {exc.code}): {capsys.readouterr().err.strip()}")
    assert args.command == command[0]


# --- .env.example -------------------------------------------------------------------------------------


def test_env_example_sets_every_variable_that_has_no_default(env: dict[str, str]) -> None:
    required = {name for name, ops in _references(COMPOSE).items() if ops & {"", "?", ":?"}}
    assert required == {"POSTGRES_PASSWORD"}
    assert required <= set(env)


def test_env_example_documents_every_knob_and_no_other() -> None:
    settings, commented = _env_example()
    assert set(settings) | set(commented) == set(_references(COMPOSE))


def test_env_example_shows_the_defaults_of_the_compose_file() -> None:
    _, commented = _env_example()
    defaults = {}
    for text in _strings(COMPOSE):
        for match in _VARIABLE.finditer(text):
            if match["op"] == ":-":
                defaults[match["braced"]] = match["arg"]
    assert commented == defaults


# --- the image ----------------------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_the_koopman_search_script() -> None:
    entrypoints = [args for instruction, args in _dockerfile_instructions() if instruction == "ENTRYPOINT"]
    assert [json.loads(args) for args in entrypoints] == [["koopman-search"]]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "koopman-search" in pyproject["project"]["scripts"]


def test_dockerfile_installs_torch_from_its_index_in_the_pyproject_range() -> None:
    installs = [args for instruction, args in _dockerfile_instructions() if instruction == "RUN" and "torch" in args]
    assert len(installs) == 1
    assert '--index-url "${TORCH_INDEX}"' in installs[0]
    spec = re.search(r'"(torch[^"]*)"', installs[0])
    assert spec is not None
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    wanted = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "torch"]
    assert len(wanted) == 1
    assert Requirement(spec[1]).specifier == wanted[0].specifier != SpecifierSet()


def test_compose_builds_with_the_dockerfiles_default_torch_index() -> None:
    args = dict(args.split("=", 1) for i, args in _dockerfile_instructions() if i == "ARG" and "=" in args)
    build_arg = COMPOSE["x-koopman"]["build"]["args"]["TORCH_INDEX"]
    assert build_arg == f"${{TORCH_INDEX:-{args['TORCH_INDEX']}}}"
    assert COMPOSE["x-koopman"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_dockerfile_runs_as_an_unprivileged_user() -> None:
    users = [args for instruction, args in _dockerfile_instructions() if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    copied = [
        source.rstrip("/")
        for instruction, args in _dockerfile_instructions()
        if instruction == "COPY"
        for source in args.split()[:-1]
    ]
    assert copied
    assert [s for s in copied if not (REPO / s).exists() or s in ignored] == []


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    assert {".env", ".venv/", "**/*.db", "**/*-artifacts/", "**/artifacts/", ".git/"} <= ignored
