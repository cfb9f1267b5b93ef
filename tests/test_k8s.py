"""deploy/k8s, checked without a cluster.

The kustomizations are rendered here (the parts of kustomize they use: resources, namespace, a
secretGenerator from env files, images, JSON 6902 patches; cross-checked against ``kubectl kustomize``
where kubectl is installed), with the Secret made from ``secrets.env.example``. Every object is validated
against the Kubernetes OpenAPI schemas bundled with kubernetes-validate (offline, strict: unknown keys are
errors), and every koopman-search container's arguments are parsed by the real CLI parser.
"""

from __future__ import annotations

import base64
import copy
import posixpath
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
WITH_PROXY = K8S / "with-proxy"
SECRETS_EXAMPLE = BASE / "secrets.env.example"
IMAGE = "koopman-search"  # the image name in the manifests; kustomize's images: sets the registry
WORKDIR = "/app"  # docker/Dockerfile (tests/test_compose.py checks it)
SLOWEST_EPOCH_S = 96  # the user's slowest epoch: a stopping worker must be given longer
# Kubernetes releases to validate against: an older one still in wide use, and the newest bundled
KUBERNETES_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
NAMESPACE = "koopman-search"
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}


# --- a small kustomize ---------------------------------------------------------------------------------


def _env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    last: str | int = int(parts[-1]) if isinstance(doc, list) and parts[-1] != "-" else parts[-1]
    return doc, last


def _json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        if op["op"] == "replace":
            present = isinstance(key, int) and key < len(parent) if isinstance(parent, list) else key in parent
            if not present:
                raise KeyError(f"JSON patch replace: nothing at {op['path']}")  # replace needs a value there
            parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise NotImplementedError(f"JSON patch op {op['op']!r}")


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return all(
        [
            target.get("kind", obj["kind"]) == obj["kind"],
            target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"],
            target.get("group", group) == group,
            target.get("version", version) == version,
        ]
    )


def render(directory: Path, secrets_file: Path = SECRETS_EXAMPLE) -> list[dict[str, Any]]:
    """What ``kubectl kustomize DIRECTORY`` prints, as objects, with the Secret from ``secrets_file``."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    known = {"apiVersion", "kind", "namespace", "resources", "secretGenerator", "generatorOptions", "images", "patches"}
    assert set(k) <= known, f"{directory}: this test's kustomize does not know {set(k) - known}"
    objects: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path, secrets_file)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text(encoding="utf-8")) if o]
    for generator in k.get("secretGenerator", []):
        assert k.get("generatorOptions", {}).get("disableNameSuffixHash") is True
        data: dict[str, str] = {}
        for _ in generator.get("envs", []):
            data.update(_env_file(secrets_file))
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": generator["name"]},
                "data": {key: base64.b64encode(v.encode()).decode() for key, v in data.items()},
            }
        )
    for image in k.get("images", []):
        for container in (c for o in objects for c in containers(o)):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    for patch in k.get("patches", []):
        hits = [o for o in objects if _matches(o, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for obj in hits:
            _json_patch(obj, yaml.safe_load(patch["patch"]))
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    return objects


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "Pod":
        return obj["spec"]  # type: ignore[no-any-return]
    if obj["kind"] in ("Job", "Deployment", "StatefulSet"):
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(obj)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, (kind, name, len(hits))
    return hits[0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module", params=["base", "with-proxy"])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / request.param)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def with_proxy() -> list[dict[str, Any]]:
    return render(WITH_PROXY)


def _koopman_containers(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", c)
        for o in objects
        for c in containers(o)
        if c["image"].split(":")[0].rsplit("/", 1)[-1] == IMAGE
    ]


# --- schemas ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(
    rendered: tuple[str, list[dict[str, Any]]], version: str
) -> None:
    _, objects = rendered
    assert {o["kind"] for o in objects} >= {
        "Namespace",
        "StatefulSet",
        "Job",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Secret",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_data_loader_pod_is_valid_too() -> None:
    pod = yaml.safe_load((BASE / "data-loader.yaml").read_text(encoding="utf-8"))
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]} == {"data"}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda job: job["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="150"),
            r"'150' is not of type 'integer'",
        ),
        (
            lambda job: job["spec"]["template"]["spec"].update(restartpolicy="OnFailure"),
            r"Additional properties are not allowed \('restartpolicy' was unexpected\)",
        ),
        (lambda job: job["spec"].pop("template"), r"'template' is a required property"),
    ],
    ids=["grace-as-string", "misspelled-key", "no-template"],
)
def test_schema_check_rejects_a_broken_worker_job(base: list[dict[str, Any]], mutate: Any, message: str) -> None:
    job = copy.deepcopy(find(base, "Job", "worker"))
    mutate(job)
    with pytest.raises(kubernetes_validate.ValidationError, match=message):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("directory", ["base", "with-proxy"])
def test_this_kustomize_renders_what_kubectl_kustomize_renders(directory: str, tmp_path: Path) -> None:
    # the cross-check of this file's own renderer: it fails, never skips, where kubectl is missing
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is needed for this cross-check: bash scripts/setup.sh --test installs it (Debian)")
    copied = tmp_path / "k8s"
    shutil.copytree(K8S, copied)
    shutil.copy(SECRETS_EXAMPLE, copied / "base" / "secrets.env")
    done = subprocess.run(
        ["kubectl", "kustomize", str(copied / directory)], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr

    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    def decoded(objects: Any) -> list[dict[str, Any]]:  # kubectl folds long base64 lines
        out = []
        for o in sorted((o for o in objects if o), key=key):
            if o["kind"] == "Secret":
                o = {**o, "data": {k: base64.b64decode("".join(v.split())) for k, v in o["data"].items()}}
            out.append(o)
        return out

    assert decoded(render(K8S / directory)) == decoded(yaml.safe_load_all(done.stdout))


# --- the commands, against the real CLI parser ------------------------------------------------------------


def test_koopman_search_containers_use_the_image_entrypoint(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    found = _koopman_containers(objects)
    assert {name for name, _ in found} >= {"Job/create", "Job/worker", "Deployment/dashboard"}
    assert [name for name, c in found if "command" in c] == []  # args only: the entrypoint is koopman-search


def test_every_container_command_parses_with_the_real_cli(
    rendered: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    from koopman_search.search.cli import build_parser

    _, objects = rendered
    for name, container in _koopman_containers(objects):
        args = container["args"]
        assert all(isinstance(a, str) for a in args), (name, args)
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"{name}: koopman-search rejects {args} (exit {exc.code}): {capsys.readouterr().err}")
        assert parsed.command == args[0]


def test_the_study_file_exists_and_its_data_is_mounted_where_it_resolves(base: list[dict[str, Any]]) -> None:
    import tomllib

    for job in ("create", "worker"):
        study = find(base, "Job", job)["spec"]["template"]["spec"]["containers"][0]["args"][1]
        assert (REPO / study).is_file(), study
    text = (REPO / "studies" / "wikitext2.toml").read_text(encoding="utf-8")
    assert tomllib.loads(text)["trainer"]["data"]["source"].startswith("hf:")  # what a clone has: the hub
    worker = find(base, "Job", "worker")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    source = env["KOOPMAN_DATA_SOURCE"]  # the pod reads the data volume's copy instead
    assert source.startswith("files:/")
    data_dir = posixpath.normpath(source[len("files:") :])
    mounts = {m["mountPath"]: m for m in worker["containers"][0]["volumeMounts"]}
    data = [m for path, m in mounts.items() if data_dir.startswith(path.rstrip("/") + "/")]
    assert len(data) == 1 and data[0]["readOnly"] is True
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes[data[0]["name"]]["persistentVolumeClaim"]["claimName"] == "data"


# --- workers ----------------------------------------------------------------------------------------------


def test_workers_are_an_indexed_job_of_one_gpu_per_pod(base: list[dict[str, Any]]) -> None:
    job = find(base, "Job", "worker")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == job["spec"]["completions"] >= 1
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    args = container["args"]
    assert args[args.index("--gpus") + 1] == "all"  # the one GPU the device plugin gives the pod
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_a_stopping_worker_has_time_to_finish_its_epoch(base: list[dict[str, Any]]) -> None:
    spec = find(base, "Job", "worker")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > SLOWEST_EPOCH_S


def test_create_worker_and_dashboard_share_the_artifact_volume(base: list[dict[str, Any]]) -> None:
    pvc = find(base, "PersistentVolumeClaim", "artifacts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for kind, name in [("Job", "create"), ("Job", "worker"), ("Deployment", "dashboard")]:
        spec = pod_spec(find(base, kind, name))
        assert spec is not None
        container = spec["containers"][0]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        }
        (mount,) = [m for m in container["volumeMounts"] if claims.get(m["name"]) == "artifacts"]
        assert container["args"][container["args"].index("--artifacts") + 1] == mount["mountPath"], name
        assert not mount.get("readOnly"), name


def test_every_claim_and_secret_that_a_pod_names_exists(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    secrets = {o["metadata"]["name"]: set(o["data"]) for o in objects if o["kind"] == "Secret"}
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in containers(obj):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (obj["metadata"]["name"], ref)


# --- the database and its password ------------------------------------------------------------------------


def test_passwords_come_from_the_secret_only(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    example = _env_file(SECRETS_EXAMPLE)
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        assert example["POSTGRES_PASSWORD"] not in yaml.safe_dump(obj), obj["metadata"]["name"]
        for container in containers(obj):
            env = env_of(container)
            for name in ("POSTGRES_PASSWORD", "OPTUNA_STORAGE"):
                if name in env and "value" in env[name]:
                    assert not make_url(env[name]["value"]).password, (obj["metadata"]["name"], name)


def test_secrets_file_is_ignored_by_git_and_docker() -> None:
    done = subprocess.run(["git", "check-ignore", "-q", str(BASE / "secrets.env")], cwd=REPO, check=False)
    assert done.returncode == 0, "deploy/k8s/base/secrets.env must be git-ignored"
    assert set(_env_file(SECRETS_EXAMPLE)) == {"POSTGRES_PASSWORD", "OPTUNA_STORAGE"}


def test_storage_url_of_the_example_names_the_postgres_service_user_database_and_password(
    base: list[dict[str, Any]],
) -> None:
    example = _env_file(SECRETS_EXAMPLE)
    url = make_url(example["OPTUNA_STORAGE"])
    postgres = find(base, "StatefulSet", "postgres")
    env = env_of(postgres["spec"]["template"]["spec"]["containers"][0])
    service = find(base, "Service", "postgres")
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert url.username == env["POSTGRES_USER"]["value"] and url.database == env["POSTGRES_DB"]["value"]
    assert url.password == example["POSTGRES_PASSWORD"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "koopman-db", "key": "POSTGRES_PASSWORD"}
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", example["POSTGRES_PASSWORD"])


def test_postgres_keeps_its_data_on_its_own_volume_and_is_checked_with_pg_isready(base: list[dict[str, Any]]) -> None:
    postgres = find(base, "StatefulSet", "postgres")
    container = postgres["spec"]["template"]["spec"]["containers"][0]
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"] and mount["mountPath"] == "/var/lib/postgresql/data"
    assert env_of(container)["PGDATA"]["value"].startswith(mount["mountPath"] + "/")
    assert container["readinessProbe"]["exec"]["command"][0] == "pg_isready"


# --- services and selectors -------------------------------------------------------------------------------


def test_every_selector_matches_its_pods_and_nothing_is_exposed_outside_the_cluster(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    pods = {
        f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["metadata"]["labels"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
            selected = [name for name, labels in pods.items() if obj["spec"]["selector"].items() <= labels.items()]
            assert len(selected) == 1, (obj["metadata"]["name"], selected)


def test_dashboard_service_reaches_the_dashboard_port(base: list[dict[str, Any]]) -> None:
    dashboard = find(base, "Deployment", "dashboard")["spec"]["template"]["spec"]["containers"][0]
    service = find(base, "Service", "dashboard")
    (port,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in dashboard["ports"]}
    args = dashboard["args"]
    assert named[port["targetPort"]] == int(args[args.index("--port") + 1]) == port["port"]
    assert args[args.index("--host") + 1] == "0.0.0.0"  # inside the pod; the Service is ClusterIP


def test_everything_namespaced_lives_in_the_one_namespace(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] not in CLUSTER_SCOPED} == {NAMESPACE}
    assert find(objects, "Namespace", NAMESPACE)


# --- the storage proxy overlay ----------------------------------------------------------------------------


def test_with_proxy_the_workers_use_the_proxy_and_everything_else_the_database(
    with_proxy: list[dict[str, Any]],
) -> None:
    from koopman_search.search.storage.proxy import parse_proxy_url

    worker = find(with_proxy, "Job", "worker")["spec"]["template"]["spec"]["containers"][0]
    host, port = parse_proxy_url(env_of(worker)["OPTUNA_STORAGE"]["value"])
    service = find(with_proxy, "Service", "storage-proxy")
    assert (host, port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    proxy = find(with_proxy, "Deployment", "storage-proxy")
    assert proxy["spec"]["replicas"] == 1  # the one that fails stale trials
    container = proxy["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert int(args[args.index("--port") + 1]) == port and args[args.index("--host") + 1] == "0.0.0.0"
    direct = {"name": "koopman-db", "key": "OPTUNA_STORAGE"}
    for kind, name in [("Job", "create"), ("Deployment", "dashboard"), ("Deployment", "storage-proxy")]:
        spec = pod_spec(find(with_proxy, kind, name))
        assert spec is not None
        assert env_of(spec["containers"][0])["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"] == direct, name


def test_the_image_installs_the_grpc_extra_for_the_proxy() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r'^RUN pip install "\.\[([a-z0-9,]*,)?grpc(,[a-z0-9,]*)?\]"$', dockerfile, re.MULTILINE)
