"""What the distribution installs: everything under one name of the project's own, ``koopman_search``.

``search`` and ``trainer`` are generic top-level names (PyPI's ``trainer`` is Coqui's), so the folders install
as ``koopman_search.search`` and ``koopman_search.trainer`` (docs/design.md, "Where things live").
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    with (REPO / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def test_every_package_folder_is_installed_under_koopman_search() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    roots = {"search": "koopman_search.search", "trainer": "koopman_search.trainer"}
    assert setuptools["package-dir"] == {name: folder for folder, name in roots.items()}
    folders = {
        roots[init.parent.relative_to(REPO).parts[0]]
        + "".join("." + p for p in init.parent.relative_to(REPO).parts[1:])
        for root in roots
        for init in (REPO / root).rglob("__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(folders)


@pytest.mark.slow
def test_the_wheel_holds_no_generic_top_level_name(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("koopman_search-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"koopman_search", next(t for t in tops if t.endswith(".dist-info"))}
    assert "koopman_search/search/storage/retry.py" in names
    assert "koopman_search/trainer/loop.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "koopman-search = koopman_search.search.cli:main" in entry_points


def test_the_installed_names_import_and_the_generic_ones_do_not(tmp_path: Path) -> None:
    code = (
        "import importlib.util as u, koopman_search.search, koopman_search.trainer\n"
        "print(u.find_spec('search') is None, u.find_spec('trainer') is None)"
    )
    # from another folder: the repository's own folders are not on the path there
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
