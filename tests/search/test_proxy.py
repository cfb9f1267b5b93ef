"""``koopman-search storage-proxy`` in front of a real PostgreSQL: workers claim, beat and finish through it.

Each test starts the proxy command as a process of its own on a fresh database, with a heartbeat interval
of 1 s (a trial is stale after 4 s), and talks to it as workers do: ``--storage grpc://127.0.0.1:PORT``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from koopman_search.search.cli import build_parser, main
from koopman_search.search.engine.study import claim_waiting_trial
from koopman_search.search.errors import SpecError, StorageError
from koopman_search.search.storage.database import GRACE_FACTOR, exclusive, open_storage
from koopman_search.search.storage.layout import trial_attrs
from koopman_search.search.storage.proxy import HEARTBEAT_KEY, open_proxy_storage, parse_proxy_url
from koopman_search.search.storage.retry import storage_task
from tests.search.study_files import KOOPMAN_SEARCH, write_study

REPO = Path(__file__).resolve().parents[2]
INTERVAL = 1  # heartbeat interval of the proxy and of its clients in these tests


class Proxy:
    """The ``storage-proxy`` command in its own process; ``url`` is what workers pass as --storage."""

    def __init__(self, database_url: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [KOOPMAN_SEARCH, "storage-proxy", "--storage", database_url, "--port", "0", "--threads", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "listening on grpc://127.0.0.1:PORT" once it serves
        if not line.startswith("listening on grpc://"):
            self.proc.kill()
            pytest.fail(f"storage-proxy did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = line.split()[-1]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("KOOPMAN_HEARTBEAT_INTERVAL", str(INTERVAL))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    return dict(os.environ)


@pytest.fixture
def proxy(postgres_url: str, env: dict[str, str]) -> Iterator[Proxy]:
    started = Proxy(postgres_url, env)
    yield started
    if started.proc.poll() is None:
        assert started.stop() == 0, started.proc.stderr.read() if started.proc.stderr else ""


def _direct_study(url: str, name: str, n_waiting: int) -> optuna.Study:
    study = optuna.create_study(storage=open_storage(url, heartbeat=False), study_name=name)
    for _ in range(n_waiting):
        study.enqueue_trial({})
    return study


# A worker as the benchmark and the trial runner use the storage: claim, beat, write attrs, finish.
CLAIM_LOOP = textwrap.dedent("""
    import json, os, sys, time
    import optuna
    from koopman_search.search.storage.database import Heartbeat, open_storage
    from koopman_search.search.engine.study import claim_waiting_trial
    storage = open_storage(sys.argv[1], heartbeat_interval=1)
    study = optuna.load_study(storage=storage, study_name="s")
    claimed = []
    while (trial := claim_waiting_trial(study)) is not None:
        with Heartbeat(storage, trial._trial_id):
            trial.set_user_attr("worker", {"pid": os.getpid()})
            time.sleep(0.05)
            study.tell(trial, 1.0)
        claimed.append(trial.number)
    print(json.dumps(claimed))
""")


@pytest.mark.postgres
def test_three_processes_through_the_proxy_claim_every_trial_exactly_once(
    postgres_url: str, proxy: Proxy, env: dict[str, str]
) -> None:
    _direct_study(postgres_url, "s", 24)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM_LOOP, proxy.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    claims = {p.pid: json.loads(out) for p, (out, _) in zip(procs, results, strict=True)}
    numbers = sorted(n for ns in claims.values() for n in ns)
    assert numbers == list(range(24))  # none lost, none twice
    trials = optuna.load_study(storage=postgres_url, study_name="s").get_trials()
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    for pid, ns in claims.items():  # the user attr written through the proxy names the claimer
        assert {t.user_attrs["worker"]["pid"] for t in trials if t.number in ns} <= {pid}
    assert all(HEARTBEAT_KEY not in t.system_attrs for t in trials)  # beats are never stored as attrs


@pytest.mark.postgres
def test_heartbeats_reach_the_database_and_the_proxy_retries_a_trial_whose_worker_died(
    postgres_url: str, proxy: Proxy, env: dict[str, str]
) -> None:
    _direct_study(postgres_url, "s", 1)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys, time, optuna
        from koopman_search.search.storage.database import Heartbeat, open_storage
        from koopman_search.search.engine.study import claim_waiting_trial
        storage = open_storage(sys.argv[1], heartbeat_interval=1)
        trial = claim_waiting_trial(optuna.load_study(storage=storage, study_name="s"))
        with Heartbeat(storage, trial._trial_id):
            print(trial.number, flush=True)
            time.sleep(600)
    """),
            proxy.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "0", worker.stderr.read() if worker.stderr else ""
    engine = sa.create_engine(postgres_url)
    try:

        def beats() -> list[float]:
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT heartbeat FROM trial_heartbeats")).all()
            return [row[0].timestamp() for row in rows]

        first = beats()
        time.sleep(2.5 * INTERVAL)
        later = beats()
        assert len(first) == len(later) == 1 and later[0] > first[0]  # it beats while the trial runs
        worker.kill()
        worker.wait(timeout=30)
        study = optuna.load_study(storage=postgres_url, study_name="s")
        deadline = time.monotonic() + GRACE_FACTOR * INTERVAL + 10
        while time.monotonic() < deadline and len(study.get_trials()) < 2:
            time.sleep(0.5)
        trials = study.get_trials()
        # the proxy found the silent trial stale, failed it and queued its retry: nobody else runs here
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
        assert trials[1].system_attrs["failed_trial"] == 0
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_trial_finished_elsewhere_cannot_be_claimed_or_finished_through_the_proxy(
    postgres_url: str, proxy: Proxy
) -> None:
    direct = _direct_study(postgres_url, "s", 1)
    via = optuna.load_study(storage=open_storage(proxy.url), study_name="s")
    trial = claim_waiting_trial(via)
    assert trial is not None
    assert claim_waiting_trial(via) is None  # the queue is empty: nothing is created
    direct.tell(trial.number, state=TrialState.FAIL)  # failed elsewhere (a stale heartbeat, say)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # the database's check, passed on
        via._storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])
    via.tell(trial, 1.0, skip_if_finished=True)  # as the trial runner finishes a trial
    assert [t.state for t in direct.get_trials()] == [TrialState.FAIL]


@pytest.mark.postgres
def test_locks_behind_the_proxy_run_unlocked_and_say_so_once(
    postgres_url: str, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(proxy.url)
    ran = []
    with caplog.at_level("WARNING", logger="koopman_search.search"):
        for rung in (1, 2):
            with exclusive(storage, f"koopman-search asha-test rung {rung}"):
                ran.append(rung)
    assert ran == [1, 2]
    said = [r.getMessage() for r in caplog.records if "no lock behind the storage proxy" in r.getMessage()]
    assert len(said) == 1 and "asha-test rung 1" in said[0]


@pytest.mark.parametrize("command", ["create", "launch"])
def test_create_and_launch_refuse_the_proxy_before_anything_is_written(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path)
    assert main([command, str(study), "--storage", "grpc://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{command} queues the study's trials under a database lock that the storage proxy cannot hold" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [study.name]


@pytest.mark.postgres
def test_a_proxy_that_goes_away_is_a_transient_error_for_the_workers(postgres_url: str, proxy: Proxy) -> None:
    _direct_study(postgres_url, "s", 1)
    storage = open_storage(proxy.url)
    study = optuna.load_study(storage=storage, study_name="s")
    assert proxy.stop() == 0
    # the storage retries it (as after a database restart), then gives up on it with a clear error
    with pytest.raises(StorageError, match="read trials: the database stayed unreachable"):
        with storage_task("read trials", timeout=1.5):
            study.get_trials()


def test_an_unreachable_proxy_is_a_clear_storage_error() -> None:
    with pytest.raises(StorageError, match=r"cannot reach the storage proxy grpc://127.0.0.1:1 within 1 s"):
        open_proxy_storage("grpc://127.0.0.1:1", timeout=1)


@pytest.mark.parametrize("url", ["grpc://", "grpc://host:port", "grpc://host:1/db", "grpc://host:1?x=1"])
def test_a_malformed_proxy_url_names_the_url(url: str) -> None:
    with pytest.raises(SpecError, match="must look like grpc://HOST:PORT"):
        parse_proxy_url(url)
    assert parse_proxy_url("grpc://koopman-proxy") == ("koopman-proxy", 13000)


def test_storage_proxy_rejects_bad_options_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from koopman_search.search.cli import main

    for argv, message in [
        (["storage-proxy"], "give --storage URL or set $OPTUNA_STORAGE"),
        (["storage-proxy", "--storage", "grpc://h:1"], "serves a database, not another proxy"),
        (["storage-proxy", "--storage", "sqlite:///x.db", "--threads", "0"], "--threads must be >= 1"),
        (["storage-proxy", "--storage", "sqlite:///x.db", "--port", "70000"], "--port must be in 0..65535"),
    ]:
        os.environ.pop("OPTUNA_STORAGE", None)
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert build_parser().parse_args(["storage-proxy", "--host", "0.0.0.0"]).port == 13000


@pytest.mark.slow
@pytest.mark.postgres
def test_worker_command_runs_a_tiny_study_through_the_proxy(
    tmp_path: Path, postgres_url: str, proxy: Proxy, env: dict[str, str]
) -> None:
    study = write_study(tmp_path, n_trials=3, epochs=2, storage=postgres_url, baseline=[2000.0, 2000.0])
    artifacts = ["--artifacts", str(tmp_path / "artifacts")]
    create = subprocess.run(
        [KOOPMAN_SEARCH, "-q", "create", str(study), *artifacts], env=env, capture_output=True, text=True, timeout=120
    )
    assert create.returncode == 0, create.stderr
    worker = subprocess.run(
        [KOOPMAN_SEARCH, "-q", "worker", str(study), "--storage", proxy.url, "--workers", "2", *artifacts],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    trials = optuna.load_study(storage=postgres_url, study_name="tiny").get_trials()
    assert len(trials) == 3 and {t.state for t in trials} == {TrialState.COMPLETE}
    for t in trials:  # what the runner stores, written through the proxy
        assert t.user_attrs["epochs_run"] == 2 and trial_attrs(t)["checkpoint"]["epoch"] == 2
    assert sorted(int(line.split()[1]) for line in worker.stdout.splitlines() if line.startswith("trial ")) == [0, 1, 2]
