"""Shared test set-up: keep $HOME clean and the network out, and build tiny data roots in code.

Every cache a library might write (Jupyter, IPython, matplotlib, Hugging Face) goes to a session temp folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="edtools-tests-"))
for _name, _sub in {
    "JUPYTER_CONFIG_DIR": "jupyter/config",
    "JUPYTER_DATA_DIR": "jupyter/data",
    "JUPYTER_RUNTIME_DIR": "jupyter/runtime",
    "IPYTHONDIR": "ipython",
    "MPLCONFIGDIR": "matplotlib",
    "HF_HOME": "hf",
    "XDG_CACHE_HOME": "cache",
    "TRITON_CACHE_DIR": "triton",
}.items():
    os.environ[_name] = str(_SANDBOX / _sub)
    (_SANDBOX / _sub).mkdir(parents=True, exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["MPLBACKEND"] = "Agg"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process the tests start (the CLI, other users' runs, kernels, JupyterLab, DDP ranks) imports edtools
# from this checkout by path, whatever the state of the environment's editable install and of the cwd.
_REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SANDBOX, ignore_errors=True)


def make_image(
    path: Path, width: int = 64, height: int = 64, color: tuple[int, int, int] = (128, 64, 32)
) -> Path:
    """Write a small real image (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = (rng.random((height, width, 3)) * 60 + np.array(color) * 0.7).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_tree(root: Path, spec: dict[str, int], sizes: tuple[tuple[int, int], ...] = ((64, 64),)) -> Path:
    """A data root: {"people/a": 5, "style": 3} makes 5 and 3 images; sizes cycle through the given (w, h)."""
    for folder, count in spec.items():
        for i in range(count):
            w, h = sizes[i % len(sizes)]
            make_image(root / folder / f"{Path(folder).name}_{i:03d}.png", w, h)
    return root


@pytest.fixture
def tree(tmp_path: Path):
    """Factory fixture: tree({"a": 3}) -> a fresh data root under tmp_path."""
    counter = iter(range(1000))

    def build(spec: dict[str, int], sizes: tuple[tuple[int, int], ...] = ((64, 64),)) -> Path:
        return make_tree(tmp_path / f"root{next(counter)}", spec, sizes)

    return build


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """One tiny SD-shaped diffusers folder for the whole session (tests never write into it)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from edtools.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def cpu_quantization(monkeypatch):
    """diffusers refuses bitsandbytes quantisation without a GPU ("No GPU found"); bitsandbytes >= 0.48 quantises
    NF4 on the CPU. Only that environment gate is lifted: loading, quantising and training are the real ones."""
    pytest.importorskip("diffusers.quantizers", reason="diffusers < 0.31 cannot quantise")
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)


def train_config(root: Path, model: Path, out: Path, **values):
    """A TrainConfig for the tiny model on the CPU at 64 px (latents 8x8), batch 2, 2 epochs, unless given."""
    from edtools.config import TrainConfig

    settings = dict(epochs=2, batch_size=2, resolution=64, lr=1e-3, progress_bar=False, device="cpu")
    return TrainConfig(data_root=str(root), model=str(model), out=str(out), **{**settings, **values})


def scan_summary(result) -> tuple:
    """Everything a scan returns, comparable with ==: two scans that agree on this found the same."""
    d = result.dataset
    return (
        d.paths,
        d.captions,
        d.widths.tolist(),
        d.heights.tolist(),
        d.concept_index.tolist(),
        d.concepts,
        result.problems,
        result.log,
    )


def concept(dataset, path: str):
    """The Concept of a dataset with this folder path."""
    return next(c for c in dataset.concepts if c.path == path)
