"""Study files: the shipped ones load, the bad ones fail with one clear line, and loading writes nothing."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import optuna
import pytest
from sqlalchemy.engine import make_url

from koopman_search.search.errors import SpecError
from koopman_search.search.studyfile.space import FixedParam
from koopman_search.search.studyfile.spec import (
    BaselineSetting,
    EnqueuedTrial,
    Objective,
    StudySpec,
    load_spec,
    spec_from_dict,
)

REPO = Path(__file__).resolve().parents[2]
STUDIES = REPO / "studies"
BAD = Path(__file__).resolve().parent / "bad_studies"
BAD_FILES = sorted(BAD.glob("*.toml"))
UNSET = "KOOPMAN_SEARCH_TEST_UNSET"

MINIMAL = """
[study]
name = "tiny"
{study}

[trainer.train]
epochs = 4
{rest}
"""


def write(tmp_path: Path, study: str = "", rest: str = "", name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MINIMAL.format(study=study, rest=rest))
    return path


# ---- the bad-study catalogue -------------------------------------------------------------------------------


def _expected(path: Path) -> tuple[str, str]:
    lines = path.read_text().splitlines()
    if not (lines[0].startswith("# expect: ") and lines[1].startswith("# key: ")):
        raise ValueError(f"{path.name} must start with '# expect: ...' and '# key: ...' lines")
    return lines[0].removeprefix("# expect: "), lines[1].removeprefix("# key: ")


def test_the_bad_study_catalogue_covers_many_mistakes() -> None:
    assert len(BAD_FILES) >= 50


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_every_bad_study_fails_with_one_line_naming_file_key_and_problem(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    expect, key = _expected(path)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    assert key in message
    assert expect in message


# ---- the shipped studies -----------------------------------------------------------------------------------


def test_quickstart_study_loads_as_a_tiny_cpu_study() -> None:
    spec = load_spec(STUDIES / "quickstart.toml")
    assert spec.trainer.data.source == "builtin"
    assert spec.trainer.train.device == "cpu"
    assert spec.trainer.model.d_model <= 64
    assert spec.storage_url == f"sqlite:///{STUDIES / 'quickstart.db'}"
    assert spec.space.params["koopman_dim"].contains(16)
    assert spec.directions == ["minimize", "minimize"]
    assert spec.baseline == BaselineSetting("auto")


def test_wikitext2_study_loads_with_the_users_setup_and_hand_tuned_trials_first(
    wikitext2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_spec(STUDIES / "wikitext2.toml").trainer.data.source == "hf:wikitext/wikitext-2-v1"  # as users get it
    # a local copy in its place, relative to where the command runs; paths compared resolved (../shared may be a link)
    monkeypatch.chdir(wikitext2_dir.parent)
    monkeypatch.setenv("KOOPMAN_DATA_SOURCE", f"files:{wikitext2_dir.name}")
    spec = load_spec(STUDIES / "wikitext2.toml")
    assert Path(spec.trainer.data.source.removeprefix("files:")).resolve() == wikitext2_dir.resolve()
    assert (spec.trainer.data.vocab_size, spec.trainer.data.seq_len, spec.trainer.data.batch_size) == (
        30000,
        128,
        32,
    )
    assert (spec.trainer.model.d_model, spec.trainer.model.n_layers, spec.epochs) == (64, 4, 10)
    assert spec.n_trials == 40
    assert spec.enqueue == (
        # the notebook's absolute thresholds (8, 7, 6) never fire on the normalised loss: the range's top, 3.0
        EnqueuedTrial("hand-tuned 1", _params(0.05, 4, 3.0, "linear", 256)),
        EnqueuedTrial("hand-tuned 2", _params(0.1, 5, 3.0, "exponential", 256)),
        EnqueuedTrial("hand-tuned 3", _params(0.02, 5, 3.0, "linear", 256)),
    )
    assert (spec.rules.total_loss_max, spec.rules.val_ppl_ratio_max) == (7.0, 1.3)


def _params(weight: float, start: int, threshold: float, schedule: str, dim: int) -> dict[str, object]:
    return {
        "koopman_weight_max": weight,
        "koopman_start_epoch": start,
        "fallback_threshold": threshold,
        "schedule": schedule,
        "koopman_dim": dim,
    }


# ---- defaults, paths and the environment -------------------------------------------------------------------


def test_a_minimal_study_takes_the_documented_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path))
    assert spec.storage_url == f"sqlite:///{tmp_path / 'tiny.db'}"
    assert spec.artifacts_dir == str(tmp_path / "tiny-artifacts")
    assert (spec.n_trials, spec.sampler, spec.sampler_seed, spec.pruner) == (30, "tpe", 0, "none")
    assert spec.shared_warmup is True
    assert spec.objectives == (Objective("val_ppl", "minimize"), Objective("val_linear_nre", "minimize"))
    assert spec.space.searched == ()
    assert spec.space.params["koopman_dim"] == FixedParam("koopman_dim", spec.trainer.koopman.dim)
    assert spec.enqueue == ()


def test_relative_paths_resolve_next_to_the_study_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        tmp_path,
        study='storage = "sqlite:///db/s.db"\nartifacts = "ckpt"',
        rest='[trainer.data]\nsource = "files:../data/wikitext-2"\ncache_dir = "cache"',
        name="studies/s.toml",
    )
    spec = load_spec(Path(os.path.relpath(path, elsewhere)))
    assert spec.trainer.data.source == f"files:{tmp_path / 'data' / 'wikitext-2'}"
    assert spec.trainer.data.cache_dir == str(tmp_path / "studies" / "cache")
    assert spec.storage_url == f"sqlite:///{tmp_path / 'studies' / 'db' / 's.db'}"
    assert spec.artifacts_dir == str(tmp_path / "studies" / "ckpt")


def test_absolute_and_non_file_sources_are_kept(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, rest='[trainer.data]\nsource = "files:/data/wt2"'))
    assert spec.trainer.data.source == "files:/data/wt2"
    spec = load_spec(write(tmp_path, rest='[trainer.data]\nsource = "hf:wikitext/wikitext-2-raw-v1"'))
    assert spec.trainer.data.source == "hf:wikitext/wikitext-2-raw-v1"


def test_env_vars_expand_and_passwords_are_percent_encoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KS_TEST_PASSWORD", "p@ss/w:rd")
    monkeypatch.setenv("KS_TEST_HOST", "db.example")
    path = write(tmp_path, study='storage = "postgresql+psycopg://koopman:${KS_TEST_PASSWORD}@${KS_TEST_HOST}:5432/ks"')
    url = make_url(load_spec(path).storage_url)
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "koopman",
        "p@ss/w:rd",
        "db.example",
        5432,
        "ks",
    )


def test_env_var_may_hold_the_whole_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KS_TEST_URL", "postgresql+psycopg://koopman:secret@127.0.0.1:5432/ks")
    assert load_spec(write(tmp_path, study='storage = "${KS_TEST_URL}"')).storage_url == os.environ["KS_TEST_URL"]


def test_a_missing_env_var_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    path = write(tmp_path, study=f'artifacts = "/shared/${{{UNSET}}}/ckpt"')
    with pytest.raises(SpecError, match=rf"environment variable {UNSET} is not set.*\[study.artifacts\]"):
        load_spec(path)


def test_a_set_env_var_expands_in_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KS_TEST_SHARED", "/mnt/shared")
    assert load_spec(write(tmp_path, study='artifacts = "${KS_TEST_SHARED}/ckpt"')).artifacts_dir == "/mnt/shared/ckpt"


# ---- passwords ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "storage",
    [
        "redis://koopman:s3cret@127.0.0.1:6379/0",
        "postgresql://koopman:s3cret@127.0.0.1:port/ks",
        "postgresql+nodriver://koopman:s3cret@127.0.0.1/ks",
        "postgresql+psycopg://koopman:s3cret@127.0.0.1",
    ],
)
def test_storage_errors_never_show_the_password(tmp_path: Path, storage: str) -> None:
    with pytest.raises(SpecError, match=r"koopman:\*\*\*@") as info:
        load_spec(write(tmp_path, study=f'storage = "{storage}"'))
    assert "s3cret" not in str(info.value)


def test_a_literal_password_gets_a_warning_that_does_not_repeat_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="koopman_search.search.studyfile.spec"):
        load_spec(write(tmp_path, study='storage = "postgresql+psycopg://koopman:s3cret@127.0.0.1/ks"'))
    assert "holds a literal password" in caplog.text
    assert "s3cret" not in caplog.text


# ---- nothing is written ------------------------------------------------------------------------------------


def test_loading_creates_no_database_and_no_artifacts_dir(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.toml"]
    assert spec.storage_url.endswith("tiny.db")


def test_loading_does_not_connect_to_a_database_server(tmp_path: Path) -> None:
    # nothing listens on port 1: a connection attempt would fail
    spec = load_spec(write(tmp_path, study='storage = "postgresql+psycopg://koopman@127.0.0.1:1/ks"'))
    assert make_url(spec.storage_url).port == 1


def test_a_missing_study_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"study file not found: .*nope\.toml"):
        load_spec(tmp_path / "nope.toml")


def test_a_directory_is_not_a_study_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="study file must be a TOML file, but got a directory"):
        load_spec(tmp_path)


# ---- the spec object ---------------------------------------------------------------------------------------


def test_a_fixed_baseline_number_is_used_for_every_epoch(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, rest="[baseline]\nval_ppl = 477"))
    assert spec.baseline == BaselineSetting("fixed", (477.0, 477.0, 477.0, 477.0))


def test_a_per_epoch_baseline_list_is_kept(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, rest="[baseline]\nval_ppl = [900, 600.0, 480.0, 470.0]"))
    assert spec.baseline == BaselineSetting("fixed", (900.0, 600.0, 480.0, 470.0))


def test_objective_metrics_join_the_metrics_that_must_stay_finite(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, study='objectives = [{ metric = "tokens_per_s", direction = "maximize" }]'))
    assert spec.directions == ["maximize"]
    assert "tokens_per_s" in spec.rules.finite_metrics and "val_ppl" in spec.rules.finite_metrics


def test_to_dict_is_plain_json_without_the_storage_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KS_TEST_PASSWORD", "s3cret")
    path = write(tmp_path, study='storage = "postgresql+psycopg://koopman:${KS_TEST_PASSWORD}@127.0.0.1/ks"')
    data = load_spec(path).to_dict()
    text = json.dumps(data, allow_nan=False)
    assert "s3cret" not in text and "storage" not in data["study"]
    assert set(data) == {"study", "trainer", "search", "rules", "baseline", "enqueue"}


def test_a_bad_data_source_override_is_refused_naming_the_file_the_key_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KOOPMAN_DATA_SOURCE", "ftp:wikitext")
    with pytest.raises(SpecError) as caught:
        load_spec(STUDIES / "wikitext2.toml")
    message = str(caught.value)
    assert "source='ftp:wikitext'" in message and "wikitext2.toml, [trainer.data.source]" in message
    assert message.endswith("set by $KOOPMAN_DATA_SOURCE") and "\n" not in message


def test_to_dict_reads_back_into_the_same_spec() -> None:
    spec = load_spec(STUDIES / "wikitext2.toml")
    again = spec_from_dict(json.loads(json.dumps(spec.to_dict())), origin="stored", base_dir=STUDIES)
    assert dataclasses.replace(again, path=spec.path, storage_url=spec.storage_url) == spec


def test_spec_from_dict_names_its_origin() -> None:
    with pytest.raises(SpecError, match=r"n_trials must be >= 1, but got n_trials=0 \(stored, \[study.n_trials\]\)"):
        spec_from_dict({"study": {"name": "x", "n_trials": 0}}, origin="stored")


def test_trial_config_and_baseline_config() -> None:
    spec = load_spec(STUDIES / "wikitext2.toml")
    cfg = spec.trial_config(spec.enqueue[1].params)
    assert (cfg.koopman.weight_max, cfg.koopman.start_epoch, cfg.koopman.schedule) == (0.1, 5, "exponential")
    assert spec.baseline_config.koopman.enabled is False
    assert spec.baseline_config.train == spec.trainer.train


def test_spec_is_frozen() -> None:
    spec = load_spec(STUDIES / "quickstart.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.n_trials = 3  # type: ignore[misc]


# ---- Optuna objects ----------------------------------------------------------------------------------------


def _spec(tmp_path: Path, study: str) -> StudySpec:
    return load_spec(write(tmp_path, study=study))


@pytest.mark.parametrize(
    ("sampler", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("nsgaii", optuna.samplers.NSGAIISampler),
    ],
)
def test_make_sampler_builds_the_named_sampler(tmp_path: Path, sampler: str, cls: type) -> None:
    assert isinstance(_spec(tmp_path, f'sampler = "{sampler}"').make_sampler(), cls)


def test_samplers_with_the_same_seed_agree_and_offsets_differ(tmp_path: Path) -> None:
    spec = _spec(tmp_path, 'sampler = "random"\nseed = 3')

    def first(offset: int) -> dict[str, object]:
        study = optuna.create_study(sampler=spec.make_sampler(seed_offset=offset))
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        return trial.params

    assert first(0) == first(0)
    assert first(0) != first(1)


def test_make_pruner(tmp_path: Path) -> None:
    single = 'objectives = [{ metric = "val_ppl", direction = "minimize" }]'
    assert isinstance(_spec(tmp_path, single).make_pruner(), optuna.pruners.NopPruner)
    assert isinstance(_spec(tmp_path, single + '\npruner = "median"').make_pruner(), optuna.pruners.MedianPruner)
    assert isinstance(_spec(tmp_path, single + '\npruner = "hyperband"').make_pruner(), optuna.pruners.HyperbandPruner)


def test_import_search_loads_neither_torch_nor_optuna_nor_sqlalchemy() -> None:
    import subprocess
    import sys

    code = "import sys, search; print(sorted(m for m in ('optuna', 'sqlalchemy', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_objective_that_needs_a_decoder_is_refused_for_the_notebooks_loss(tmp_path: Path) -> None:
    path = tmp_path / "nb.toml"
    objective = (
        '[{ metric = "val_ppl", direction = "minimize" }, '
        '{ metric = "val_koopman_forward_ppl", direction = "minimize" }]'
    )
    path.write_text(
        f'[study]\nname = "nb"\nobjectives = {objective}\n[trainer.koopman]\nloss = "smooth_l1"\n', encoding="utf-8"
    )
    with pytest.raises(
        SpecError,
        match=r"val_koopman_forward_ppl needs koopman.loss = \"decoder\".*"
        r"loss='smooth_l1'.*\[trainer.koopman.loss\]",
    ):
        load_spec(path)


def test_the_default_objectives_need_no_decoder(tmp_path: Path) -> None:
    path = tmp_path / "nb.toml"
    path.write_text('[study]\nname = "nb"\n[trainer.koopman]\nloss = "smooth_l1"\n', encoding="utf-8")
    assert load_spec(path).objectives[1] == Objective("val_linear_nre", "minimize")


def test_a_linear_objective_is_refused_when_the_measure_is_off(tmp_path: Path) -> None:
    path = tmp_path / "off.toml"
    path.write_text('[study]\nname = "off"\n[trainer.train]\nlinear_fit_tokens = 0\n', encoding="utf-8")
    with pytest.raises(
        SpecError,
        match=r"objective val_linear_nre needs the linear replacement measured.*linear_fit_tokens=0.*"
        r"\[trainer.train.linear_fit_tokens\]",
    ):
        load_spec(path)


def test_a_negative_collapse_floor_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "floor.toml"
    path.write_text('[study]\nname = "f"\n[rules]\nphi_rank_min = -1\n', encoding="utf-8")
    with pytest.raises(SpecError, match=r"phi_rank_min must be a finite number >= 0.*\[rules.phi_rank_min\]"):
        load_spec(path)


def test_the_shipped_studies_load(tmp_path: Path) -> None:
    for name in ("quickstart", "wikitext2", "notebook"):
        spec = load_spec(REPO / "studies" / f"{name}.toml")
        assert spec.objectives[0].metric == "val_ppl"
    nb = load_spec(REPO / "studies" / "notebook.toml")
    assert (nb.trainer.koopman.loss, nb.trainer.koopman.fit) == ("smooth_l1", "dmd")


@pytest.mark.parametrize("length", [500, 600])
def test_a_study_name_longer_than_the_limit_is_refused_naming_the_key(tmp_path: Path, length: int) -> None:
    path = tmp_path / "long.toml"
    path.write_text(f'[study]\nname = "{"n" * length}"\n', encoding="utf-8")
    with pytest.raises(SpecError, match=rf"name must be at most 128 characters.*{length} characters.*\[study.name\]"):
        load_spec(path)
    path.write_text(f'[study]\nname = "{"n" * 128}"\n', encoding="utf-8")
    assert load_spec(path).name == "n" * 128  # exactly at the limit is kept
