"""scripts/venv.sh, the install guard of scripts/run.sh and scripts/test.sh: it must install on
a fresh machine and skip the install only when the venv really holds purifier.

The venvs here are real (``venv.create`` without pip, well under a second) with hand-written
``.dist-info`` folders standing in for installed packages, so no test needs pip or a network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "scripts" / "venv.sh"


def bash(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{LIB}"; {script}', "bash", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def ready(env: Path, root: Path, extra: str = "") -> bool:
    return bash('venv_ready "$1" "$2" "$3"', str(env), str(root), extra).returncode == 0


def site_packages(env: Path) -> Path:
    (sp,) = (env / "lib").glob("python3*/site-packages")
    return sp


def fake_dist(env: Path, name: str, version: str) -> None:
    info = site_packages(env) / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def bare_venv(path: Path) -> Path:
    venv.create(path, with_pip=False, symlinks=True)
    return path


def checkout(path: Path, deps: list[str], test: list[str]) -> Path:
    """A stand-in repo: a `purifier` package and a pyproject.toml naming `deps`."""
    (path / "purifier").mkdir(parents=True)
    (path / "purifier" / "__init__.py").write_text("")
    quoted = lambda xs: ", ".join(f'"{x}"' for x in xs)  # noqa: E731
    (path / "pyproject.toml").write_text(
        f'[project]\nname = "purifier"\nversion = "0.1.0"\ndependencies = [{quoted(deps)}]\n'
        f"[project.optional-dependencies]\ntest = [{quoted(test)}]\n")
    return path


def install_stub(env: Path, root: Path) -> None:
    """What `pip install -e ROOT` leaves behind, reduced to what the guard can see: the
    distribution's metadata, the package importable from ROOT, and the console script."""
    fake_dist(env, "purifier", "0.1.0")
    (site_packages(env) / "__editable__purifier.pth").write_text(f"{root}\n")
    script = env / "bin" / "purifier"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)


@pytest.fixture()
def repo(tmp_path) -> Path:
    return checkout(tmp_path / "repo", deps=["fakedep==1.2", "otherdep>=3"], test=["fake-tester[x]>=1"])


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the guard reads pyproject.toml with tomllib")
def test_fresh_venv_is_not_ready_although_the_working_tree_imports(tmp_path):
    """The bug this guard replaced: from the repo root, a fresh venv imports purifier.cli from
    the working tree, so an import check there skipped `pip install -e .`."""
    env = bare_venv(tmp_path / "venv")
    old_check = subprocess.run([str(env / "bin" / "python"), "-c", "import purifier.cli"], cwd=ROOT)
    assert old_check.returncode == 0  # the working tree is importable without any install
    assert not ready(env, ROOT)
    assert not ready(tmp_path / "no-venv-here", ROOT)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the guard reads pyproject.toml with tomllib")
def test_installed_venv_is_ready_and_each_missing_piece_is_noticed(tmp_path, repo):
    env = bare_venv(tmp_path / "venv")
    install_stub(env, repo)
    assert not ready(env, repo)  # purifier is there, its dependencies are not
    fake_dist(env, "fakedep", "1.2")
    fake_dist(env, "otherdep", "3.1")
    assert ready(env, repo)
    assert not ready(env, repo, "test")  # the test extra is not installed
    fake_dist(env, "fake-tester", "2.0")
    assert ready(env, repo, "test")

    (env / "bin" / "purifier").unlink()  # no console script: run.sh could not start it
    assert not ready(env, repo)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the guard reads pyproject.toml with tomllib")
def test_a_changed_pin_or_another_checkout_needs_an_install(tmp_path, repo):
    env = bare_venv(tmp_path / "venv")
    install_stub(env, repo)
    fake_dist(env, "fakedep", "1.1")  # pyproject now pins 1.2
    fake_dist(env, "otherdep", "3.1")
    assert not ready(env, repo)

    other = checkout(tmp_path / "other-clone", deps=[], test=[])
    env2 = bare_venv(tmp_path / "venv2")
    install_stub(env2, other)  # installed from another clone: its code, not this one's
    assert ready(env2, other)
    assert not ready(env2, checkout(tmp_path / "this-clone", deps=[], test=[]))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the guard reads pyproject.toml with tomllib")
def test_ensure_venv_installs_only_when_not_ready(tmp_path, repo):
    """These venvs have no pip: ensure_venv succeeds only if it never calls it, and fails
    (having tried) when it must install."""
    env = bare_venv(repo / ".venv")
    install_stub(env, repo)
    fake_dist(env, "fakedep", "1.2")
    fake_dist(env, "otherdep", "3.1")
    done = bash('ensure_venv "$1"', str(repo))
    assert done.returncode == 0, done.stderr
    assert "installing" not in done.stderr

    needs_extra = bash('ensure_venv "$1" test', str(repo))
    assert needs_extra.returncode != 0
    assert "installing purifier[test]" in needs_extra.stderr
    assert "No module named pip" in needs_extra.stderr  # it went for pip


def test_run_and_test_scripts_use_the_guard():
    for name in ("run.sh", "test.sh"):
        script = ROOT / "scripts" / name
        assert os.access(script, os.X_OK)
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert "source scripts/venv.sh" in text and "ensure_venv" in text, name
        assert "import purifier" not in text, name  # no import check from the working tree
