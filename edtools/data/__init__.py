"""Data loading: an epoch's schedule turned into the tensors a step trains on. images (decode, crop, flip) and
captions (dropout, tag shuffling, token ids) make batches; latents caches what the VAE made of them.
"""

from .batches import ScheduleBatches, make_loader
from .captions import CaptionSetting, caption_variant, concept_caption_settings, token_ids
from .images import Crop, decode_image, image_size, load_image, plan_crop
from .latents import LatentCache, LatentStore, latent_key, vae_key

__all__ = [
    "CaptionSetting",
    "Crop",
    "LatentCache",
    "LatentStore",
    "ScheduleBatches",
    "caption_variant",
    "concept_caption_settings",
    "decode_image",
    "image_size",
    "latent_key",
    "load_image",
    "make_loader",
    "plan_crop",
    "token_ids",
    "vae_key",
]
