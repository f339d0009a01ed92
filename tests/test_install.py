"""The notebook's installer keeps every installed package that satisfies edtools and installs only the rest;
requirements.txt and the locks of tested versions stay in step with pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edtools.install import plan, requirements_of


def test_installed_versions_that_fit_are_kept_and_the_rest_installed():
    requirements = ["torch>=2.1", "transformers>=4.40", "ipywidgets>=7.7", "peft>=0.13", "diffusers>=0.30"]
    installed = {
        "torch": "2.5.1+cu121",
        "Transformers": "4.39.0",
        "ipywidgets": "7.7.1",
        "diffusers": "0.31.0",
    }
    keep, install = plan(requirements, installed)
    assert keep == ["torch==2.5.1+cu121", "ipywidgets==7.7.1", "diffusers==0.31.0"]
    assert install == ["transformers>=4.40", "peft>=0.13"]  # too old, and missing


def test_edtools_requirements_follow_the_extras():
    train = requirements_of(["train"])
    assert any(r.startswith("diffusers") for r in train) and not any(
        r.startswith("ipywidgets") for r in train
    )
    notebook = requirements_of(["notebook"])
    assert any(r.startswith("ipywidgets>=7.7") for r in notebook) and not any(
        r.startswith("torch") for r in notebook
    )
    assert any(r.startswith("numpy") for r in notebook)  # the base requirements always


# ---------------------------------------------------------------------------------------------------------
# requirements.txt and the locks stay in step with pyproject.toml, the one list of what edtools needs

REPO = Path(__file__).resolve().parents[1]
LOCKS = {"tested": REPO / "constraints" / "tested.txt", "colab": REPO / "constraints" / "colab-tested.txt"}
NOT_FROZEN = {"edtools", "torch", "pip", "setuptools", "wheel", "distribute"}  # pip freeze leaves them out


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_requirements_txt_installs_the_project_with_its_train_and_notebook_extras():
    lines = [
        line.strip()
        for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == [".[train,notebook]"]  # a reference, so the list itself lives in pyproject alone
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"train", "notebook"} <= set(extras)


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_each_lock_pins_every_requirement_within_its_range(lock):
    """Every package pyproject names (torch aside) is pinned, at a version its range admits; the Colab lock
    also keeps Colab's own versions (constraints/colab.txt)."""
    project = _pyproject()["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    if lock == "colab":
        colab = REPO / "constraints" / "colab.txt"
        requirements += [Requirement(r) for r in _requirement_lines(colab)]
    pins = _pins(LOCKS[lock])
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name in NOT_FROZEN:
            continue
        assert name in pins, f"{LOCKS[lock].name} does not pin {name}: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCKS[lock].name} pins {name}=={pins[name]}, outside {requirement}: run make lock"
        )


def test_this_environment_holds_exactly_the_locked_versions():
    """`make test` and `make test-colab` name their lock in EDTOOLS_LOCK: what pip installed is that set,
    nothing more, nothing less (torch aside). Other environments (make test-latest) have no lock to match."""
    lock = os.environ.get("EDTOOLS_LOCK")
    if not lock:
        pytest.skip("EDTOOLS_LOCK is not set: this environment was not installed from a lock")
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions()
        if dist.metadata["Name"] and canonicalize_name(dist.metadata["Name"]) not in NOT_FROZEN
    }
    assert installed == _pins(REPO / lock)


def test_what_the_readme_steps_write_is_ignored_by_git():
    """make demo writes demo/, the notebook edtools_demo/ beside itself, make test-latest .venv-latest/."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    paths = ["demo/run/x", "notebooks/edtools_demo/data/x", ".venv-latest/x", ".venv/x", ".venv-colab/x"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.split() == paths


def _requirement_lines(path: Path) -> list[str]:
    return [
        line.split("#")[0].strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.split("#")[0].strip()
    ]
