"""Model folders written in one test environment load with the same weights in the other (make test-colab).

The main env (.venv: transformers 5) and the Colab-like one (.venv-colab: transformers 4) each write and read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from single_file_cases import differing, module_names  # noqa: E402

from edtools.models import load_components, save_components, tiny_components  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The environments `make test` builds (main, then Colab's); from either, the test runs the other's python.
MAIN, COLAB = REPO / ".venv", REPO / ".venv-colab"
CAPTIONS = ["a photo of a red dog", "Portrait of a WOMAN, in the style of ünïcode: 42 cats!", ""]


def tensors_of(model, architecture: str, reader: str) -> dict:
    """reader/part/name -> tensor of SDComponents or a diffusers pipeline: each module's weights (names without
    the text_model. level, which transformers 5's CLIPTextModel lacks) and each tokenizer's ids for CAPTIONS."""
    modules = module_names(architecture)
    tensors = {
        f"{reader}/{module}/{name.removeprefix('text_model.')}": tensor.contiguous()
        for module in modules
        for name, tensor in getattr(model, module).state_dict().items()
    }
    for module in modules:
        if module.startswith("text_encoder"):
            tokenizer = getattr(model, module.replace("text_encoder", "tokenizer"))
            ids = tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt").input_ids
            tensors[f"{reader}/{module.replace('text_encoder', 'tokenizer')}/input_ids"] = ids
    return tensors


def write_folder(folder: Path, architecture: str) -> dict:
    """Save a tiny model folder the way edtools saves every folder; the tensors it meant to write."""
    components = tiny_components(architecture)
    save_components(components, folder)
    return tensors_of(components, architecture, "written")


def read_folder(folder: Path, architecture: str) -> dict:
    """The tensors of what edtools' loader and a diffusers pipeline load from the folder."""
    pipeline = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    return {
        **tensors_of(load_components(str(folder)), architecture, "edtools"),
        **tensors_of(pipeline, architecture, "diffusers"),
    }


def other_python() -> Path:
    """EDTOOLS_OTHER_PYTHON, else the python of the environment (MAIN, COLAB) this one is not."""
    named = os.environ.get("EDTOOLS_OTHER_PYTHON")
    if named:
        if not Path(named).is_file():
            pytest.fail(
                f"EDTOOLS_OTHER_PYTHON is {named}, which is not a file; point it at a venv's bin/python"
            )
        return Path(named)
    other = MAIN if Path(sys.prefix).name == COLAB.name else COLAB
    if not (other / "bin" / "python").is_file():
        pytest.skip(
            f"the other test environment {other} does not exist (make test-colab builds {COLAB.name}, make venv "
            f"{MAIN.name}); or set EDTOOLS_OTHER_PYTHON to its python"
        )
    return other / "bin" / "python"


def run_other(*args: str) -> str:
    """This file's main() in the other environment, importing this checkout's edtools; its transformers version.
    The environment passes on, so its caches stay in conftest's temp folders and the network stays out."""
    python = other_python()
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    done = subprocess.run(
        [str(python), __file__, *args], env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True
    )
    assert done.returncode == 0, (
        f"{python} {Path(__file__).name} {' '.join(args)} failed:\n{done.stderr[-4000:]}"
    )
    return done.stdout.split()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
@pytest.mark.parametrize("writer", ["this-writes", "other-writes"])
def test_a_folder_loads_the_same_weights_in_the_other_environment(tmp_path, architecture, writer):
    folder, tensors = tmp_path / "model", tmp_path / "tensors.safetensors"
    here = transformers.__version__
    if writer == "this-writes":
        written = write_folder(folder, architecture)
        other = run_other("read", architecture, str(folder), str(tensors))
        loaded, versions = safetensors_torch.load_file(tensors), f"transformers {here} wrote, {other} read"
    else:
        other = run_other("write", architecture, str(folder), str(tensors))
        written, loaded = safetensors_torch.load_file(tensors), read_folder(folder, architecture)
        versions = f"transformers {other} wrote, {here} read"
    expected = {name.split("/", 1)[1]: tensor for name, tensor in written.items()}
    for reader in ("edtools", "diffusers"):
        got = {name.split("/", 1)[1]: t for name, t in loaded.items() if name.startswith(reader + "/")}
        wrong = differing(expected, got)
        assert not wrong, (
            f"{versions}: {reader} loaded {len(wrong)} of {len(expected)} tensors wrong: {wrong[:4]}"
        )


def main(job: str, architecture: str, folder: str, tensors: str) -> None:
    """In the other environment: write a folder, or read one; the tensors go to a safetensors file, then the
    transformers version to stdout."""
    weights = (
        write_folder(Path(folder), architecture)
        if job == "write"
        else read_folder(Path(folder), architecture)
    )
    safetensors_torch.save_file(weights, tensors)
    print(transformers.__version__)


if __name__ == "__main__":
    main(*sys.argv[1:])
