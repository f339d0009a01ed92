"""The notebook's installer keeps every installed package that satisfies edtools and installs only the rest."""

from __future__ import annotations

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
