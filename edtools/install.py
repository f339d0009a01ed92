"""Installing edtools' dependencies into a runtime that already has most of them (Colab): every installed package
whose version satisfies edtools stays as it is; only what is missing or too old is installed.

Run as `python -m edtools.install train notebook` after `pip install --no-deps edtools`; it says plainly when the
runtime must be restarted (a package changed under a running kernel).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata

__all__ = ["install", "plan", "requirements_of"]


def requirements_of(extras: Sequence[str]) -> list[str]:
    """edtools' own requirements with the given extras, from its installed metadata (pyproject.toml)."""
    from packaging.requirements import Requirement

    wanted = []
    for text in metadata.requires("edtools") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
            requirement.marker = None
            wanted.append(str(requirement))
    return wanted


def plan(requirements: Sequence[str], installed: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(constraints pinning the installed versions that satisfy their requirement, requirements to install).
    A package that is missing or does not satisfy edtools is left to pip; everything else is kept as it is."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    versions = {canonicalize_name(name): version for name, version in installed.items()}
    keep, install = [], []
    for text in requirements:
        requirement = Requirement(text)
        version = versions.get(canonicalize_name(requirement.name))
        if version is not None and requirement.specifier.contains(version, prereleases=True):
            keep.append(f"{requirement.name}=={version}")
        else:
            install.append(str(requirement))
    return keep, install


def _installed() -> dict[str, str]:
    return {dist.metadata["Name"]: dist.version for dist in metadata.distributions() if dist.metadata["Name"]}


def install(extras: Sequence[str], *, pip: Sequence[str] = (sys.executable, "-m", "pip")) -> int:
    """pip install what edtools needs for the extras with the satisfying installed versions pinned; prints what
    changed and whether to restart. Returns pip's exit code."""
    keep, todo = plan(requirements_of(extras), before := _installed())
    if not todo:
        print("edtools: every dependency is installed already; nothing to do")
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\n".join(keep) + "\n")
    print(f"edtools: installing {', '.join(todo)}; keeping {len(keep)} installed package(s) as they are")
    done = subprocess.run([*pip, "install", "-q", "-c", constraints.name, *todo])
    if done.returncode != 0:
        return done.returncode
    after = _installed()
    changed = sorted(name for name, version in before.items() if after.get(name, version) != version)
    if changed:
        lines = ", ".join(f"{name} {before[name]} -> {after[name]}" for name in changed)
        print(
            f"edtools: changed {lines}. Restart the runtime (Colab: Runtime > Restart session), then run the cells again."
        )
    else:
        print("edtools: no installed package changed; no restart needed")
    return 0


if __name__ == "__main__":
    sys.exit(install(sys.argv[1:] or ["train", "notebook"]))
