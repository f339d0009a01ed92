"""What the UNet is conditioned on, as each model family says (families: SD's last hidden states; SDXL's two
encoders, pooled text and each image's size/crop), and the cache of frozen encoders' outputs per caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import require
from .families import TextEmbeddings, family_of

if TYPE_CHECKING:
    import torch

    from .components import SDComponents

__all__ = ["TextEmbeddingCache", "TextEmbeddings", "encode_text", "encoders_key", "unet_conditioning"]


def encode_text(components: SDComponents, input_ids: Sequence[torch.Tensor]) -> TextEmbeddings:
    """Run the text encoder(s) on token ids (one tensor per tokenizer) on the encoders' device."""
    return family_of(components).encode_text(components, input_ids)


def unet_conditioning(
    components: SDComponents, embeddings: TextEmbeddings, time_ids: torch.Tensor | None, *, device: Any
) -> dict[str, Any]:
    """Keyword arguments of unet(noisy, timesteps, **kwargs): the text, and for SDXL the pooled text and
    the time ids (original size, crop top-left, target size of each image, as data.Crop.time_ids)."""
    return family_of(components).unet_conditioning(components, embeddings, time_ids, device=device)


def encoders_key(components: SDComponents) -> str:
    """A short fingerprint of the text encoders and tokenizers: cached embeddings belong to them."""
    import hashlib
    import json

    digest = hashlib.sha1()
    for encoder, tokenizer in zip(components.text_encoders, components.tokenizers, strict=True):
        digest.update(json.dumps(encoder.config.to_dict(), sort_keys=True, default=str).encode("utf-8"))
        digest.update(str(len(tokenizer)).encode("utf-8"))
        for name, tensor in sorted(encoder.state_dict().items()):
            digest.update(name.encode("utf-8"))
            digest.update(tensor.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class TextEmbeddingCache:
    """Frozen text encoders' outputs per caption, kept on the CPU: each caption is encoded once, after which
    the encoders can leave the GPU. Only valid while no text encoder trains. With a folder (named for the
    encoders: see encoders_key) they are also kept on disk, and later runs read them instead of encoding."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self._store: dict[str, TextEmbeddings] = {}
        self.folder = Path(folder) if folder is not None else None
        # the text encoders (parts) freed once the cache was filled (T5): nothing may encode after that, so
        # samples are conditioned from the cache (train.sample)
        self.freed: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self._store)

    def fill(self, components: SDComponents, captions: Sequence[str], *, batch_size: int = 16) -> None:
        """Encode every caption not cached yet, batch_size at a time (no gradient)."""
        torch = require("torch")
        from ..data import token_ids

        todo = sorted(set(captions) - set(self._store))
        if self.folder is not None:
            todo = [caption for caption in todo if not self._read(caption)]
        if todo and self.freed:
            raise KeyError(
                f"{len(todo)} caption(s) were not encoded before {', '.join(self.freed)} was freed, e.g. {todo[0]!r}"
            )
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            with torch.no_grad():
                ids = [token_ids(tokenizer, chunk) for tokenizer in components.tokenizers]
                encoded = encode_text(components, ids)
            for row, caption in enumerate(chunk):
                pooled = None if encoded.pooled is None else encoded.pooled[row].cpu()
                self._store[caption] = TextEmbeddings(encoded.hidden[row].cpu(), pooled)
                self._write(caption)

    def _file(self, caption: str) -> Path:
        import hashlib

        digest = hashlib.sha1(caption.encode("utf-8")).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def _read(self, caption: str) -> bool:
        path = self._file(caption)
        if not path.is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                if file.metadata().get("caption") != caption:  # a hash collision would be another caption
                    return False
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except Exception:  # a damaged entry is encoded again
            return False
        self._store[caption] = TextEmbeddings(tensors["hidden"], tensors.get("pooled"))
        return True

    def _write(self, caption: str) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        from ..atomic import atomic_file

        embeddings = self._store[caption]
        tensors = {"hidden": embeddings.hidden.contiguous()}
        if embeddings.pooled is not None:
            tensors["pooled"] = embeddings.pooled.contiguous()
        with atomic_file(self._file(caption)) as tmp:
            save_file(tensors, str(tmp), metadata={"caption": caption})

    def get(self, captions: Sequence[str]) -> TextEmbeddings:
        """The embeddings of a batch's captions, stacked (on the CPU); every caption must be cached."""
        torch = require("torch")
        missing = [c for c in captions if c not in self._store]
        if missing:
            raise KeyError(
                f"{len(missing)} caption(s) were never encoded, e.g. {missing[0]!r}; call fill first"
            )
        rows = [self._store[c] for c in captions]
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return TextEmbeddings(torch.stack([r.hidden for r in rows]), pooled)
