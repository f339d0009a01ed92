"""Helpers for test_single_file: a fake Hugging Face cache snapshot, a pickle that would run code, and
state-dict comparisons. No network, no downloads."""

from __future__ import annotations

import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def fake_hub_snapshot(cache: Path, repo_id: str, folder: Path, revision: str = "0" * 40) -> Path:
    """Put a diffusers folder's configs and tokenizer files (no weights) into a Hugging Face hub cache as the
    snapshot of repo_id, the way huggingface_hub lays out a download (refs/main -> snapshots/<commit>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for file in folder.rglob("*"):
        if file.is_file() and file.suffix not in WEIGHT_SUFFIXES:
            target = snapshot / file.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


class OpensAFile:
    """Unpickling this calls open(path, "w"): a stand-in for code a malicious .ckpt would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def module_names(architecture: str) -> tuple[str, ...]:
    return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if architecture == "sdxl" else ())


def differing(a, b) -> list[str]:
    """Names whose tensors differ between two modules (or state dicts); [] when all are bit-equal."""
    import torch

    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    if sa.keys() != sb.keys():
        return sorted(set(sa) ^ set(sb))
    return [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
