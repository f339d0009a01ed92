"""VAE latents cached per image, crop and flip: in memory or on disk under a key of the VAE's weights, so an
image is encoded once and later runs reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .images import Crop

if TYPE_CHECKING:
    import torch


class LatentStore:
    """Cached VAE latents by key: in memory for this run, or as files under folder/<vae key>/ that later runs
    reuse. A key names the image file (path, size, modification time), its crop and flip; the folder names the
    VAE, so another VAE, another crop or an edited image is another entry. Writes are atomic."""

    def __init__(
        self, mode: str = "memory", folder: str | os.PathLike | None = None, vae_key: str = ""
    ) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"a latent store is memory or disk, not {mode!r}")
        if mode == "disk" and folder is None:
            raise ValueError("a disk latent store needs a folder")
        self.mode = mode
        self.folder = Path(folder) / "latents" / vae_key if folder is not None else None
        self._memory: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        if self.mode == "memory":
            return len(self._memory)
        return sum(1 for _ in self.folder.glob("*/*.safetensors")) if self.folder.is_dir() else 0

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if self.mode == "memory":
            return self._memory.get(key)
        path = self._file(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(path)["latents"]
        except Exception:  # a damaged entry is encoded again (and rewritten)
            return None

    def put(self, key: str, latents: torch.Tensor) -> None:
        latents = latents.detach().cpu().contiguous()
        if self.mode == "memory":
            self._memory[key] = latents
            return
        from safetensors.torch import save_file

        from ..atomic import atomic_file

        with atomic_file(self._file(key)) as tmp:
            save_file({"latents": latents}, str(tmp))


def latent_key(root: Path, path: str, crop: Crop) -> str:
    """The cache key of one image under one crop: its file's identity (path, size, modification time), the
    resize, the cut and the flip."""
    import hashlib

    stat = (root / path).stat()
    identity = (
        f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{crop.cover[0]}x{crop.cover[1]}|{crop.left},{crop.top}|"
        f"{crop.size[0]}x{crop.size[1]}|{int(crop.flip)}"
    )
    return hashlib.sha1(identity.encode("utf-8")).hexdigest()


def vae_key(vae: Any) -> str:
    """A short fingerprint of a VAE's config and weights: cached latents belong to the VAE that made them."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps(dict(vae.config), sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(
            tensor.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes()
        )  # the head of each tensor
        digest.update(str(tuple(tensor.shape)).encode("utf-8"))
    return digest.hexdigest()[:16]


class LatentCache:
    """VAE latents of the batch's images. Without a store, a fresh sample of the latent distribution every
    time; with one (memory or disk), each image's mean latent under each crop and flip it is trained with,
    encoded once (one image at a time: the VAE's peak memory is one image's) and reused. Batches built with
    the same store arrive with the cached rows already filled and those images never decoded."""

    def __init__(self, store: LatentStore | None = None) -> None:
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def __len__(self) -> int:
        return len(self.store) if self.store is not None else 0

    def latents(
        self, batch: dict, vae, scaling_factor: float, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents [n, C, H/8, W/8] on the VAE's device and dtype (no gradient)."""
        import torch

        pixels = batch["pixel_values"]
        if self.store is None:
            with torch.no_grad():
                encoded = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
                return encoded.sample(generator=generator) * scaling_factor
        keys = batch["latent_keys"]
        cached = list(batch.get("cached_latents") or [None] * len(keys))
        # pixel rows exist for the images that were not cached when the batch was made
        rows = iter(range(pixels.shape[0]))
        with torch.no_grad():
            for i, key in enumerate(keys):
                if cached[i] is None:
                    row = next(rows)
                    cached[i] = self.store.get(key)
                    if cached[i] is None:
                        image = pixels[row : row + 1].to(device=vae.device, dtype=vae.dtype)
                        cached[i] = vae.encode(image).latent_dist.mode()[0].cpu()
                        self.store.put(key, cached[i])
        stacked = torch.stack(cached)
        return stacked.to(device=vae.device, dtype=vae.dtype) * scaling_factor
