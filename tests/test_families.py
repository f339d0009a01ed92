"""Model families: the registry finds each family by name, variant, files and parts; every registered family
meets the interface (its tiny model builds, is recognised, round-trips through a single file, samples)."""

from __future__ import annotations

import pytest

from edtools.errors import ModelError
from edtools.models import families
from edtools.models.families import (
    FAMILIES,
    Family,
    detect_variant,
    family,
    family_names,
    family_of_index,
    guess_family,
    variant_of_model_type,
    variants,
)
from edtools.models.families.sd import StableDiffusion

VARIANTS = [(f.name, v) for f in FAMILIES for v in f.variants]


def test_registry_names_families_and_variants():
    assert family_names() == ("sd", "sdxl", "sd3", "flux")
    assert variants() == ("sd1", "sd2", "sdxl", "sd3", "flux-dev", "flux-schnell")
    assert family("sd1") is family("sd2") is family("sd")
    assert family("sdxl").name == "sdxl"
    assert family("flux-schnell") is family("flux")
    with pytest.raises(
        ValueError, match=r"'wan'; allowed: sd, sdxl, sd3, flux, sd1, sd2, sdxl, sd3, flux-dev"
    ):
        family("wan")


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_each_family_names_its_variants_consistently(name, variant):
    fam = family(variant)
    assert isinstance(fam, Family) and fam.name == name
    assert fam.variant_label(variant) in fam.variant_article(variant)
    assert fam.subfolders[:5] == (fam.denoiser_part, "vae", "text_encoder", "tokenizer", "scheduler")
    if not fam.single_files:
        with pytest.raises(ModelError, match="diffusers folders"):
            fam.single_file_text(variant)
        return
    assert variant_of_model_type(fam.diffusers_model_type(variant)) == variant
    layouts = fam.single_file_text(variant)
    # layouts are of required encoders, in order; an encoder without one (any T5) comes from model_config
    required = [spec.part for spec in fam.text_encoders if not spec.optional]
    parts = [layout.part for layout in layouts]
    assert parts == [part for part in required if part in parts]
    assert all(spec.part in parts or spec.is_t5 for spec in fam.text_encoders if not spec.optional)
    assert len({layout.label for layout in layouts}) == len(layouts)


def test_families_tell_model_indexes_apart():
    sd = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    xl = {**sd, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    assert family_of_index(sd, "m").name == "sd"
    assert family_of_index(xl, "m").name == "sdxl"
    refiner = {**xl, "text_encoder": [None, None], "_class_name": "StableDiffusionXLImg2ImgPipeline"}
    with pytest.raises(ModelError, match="SDXL refiner"):
        family_of_index(refiner, "m")


def test_families_detect_single_file_keys():
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert detect_variant([unet, "cond_stage_model.transformer.text_model.x"]) == "sd1"
    assert detect_variant([unet, "cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert detect_variant(
        [unet, "conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"]
    ) == ("sdxl")
    # class-conditioned (unCLIP) and refiner files belong to no family
    assert (
        detect_variant([unet, "model.diffusion_model.label_emb.0.0.weight", "cond_stage_model.model.x"])
        is None
    )
    assert detect_variant([unet, "conditioner.embedders.0.model.x"]) is None


def test_guess_family_by_hub_id():
    assert guess_family("stabilityai/stable-diffusion-xl-base-1.0").name == "sdxl"
    assert guess_family("runwayml/stable-diffusion-v1-5").name == "sd"


def test_a_registered_family_is_found(monkeypatch):
    class Other(StableDiffusion):
        name = "other"
        variants = ("other1",)

    other = Other()
    monkeypatch.setattr(families, "FAMILIES", (*FAMILIES, other))
    assert family("other1") is other
    assert families.variants()[-1] == "other1"


torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_tiny_model_of_every_family_round_trips(tmp_path, name, variant):
    from edtools.models import family_of, load_components, make_tiny_model, save_single_file

    folder = make_tiny_model(tmp_path / "model", variant, seed=1)
    loaded = load_components(str(folder))
    fam = family_of(loaded)
    assert (fam.name, fam.variant_of(loaded), loaded.architecture) == (name, variant, name)
    assert guess_family(str(folder)) is fam
    if not fam.single_files:
        with pytest.raises(ModelError, match="not single files"):
            save_single_file(loaded, tmp_path / "model.safetensors", dtype="fp32")
        return
    single = save_single_file(loaded, tmp_path / "model.safetensors", dtype="fp32")
    assert guess_family(str(single)) is fam
    # diffusers' Flux reader is fixed to the real width: test_flux_single_file reads one back
    if name == "flux":
        return
    back = load_components(str(single), model_config=str(folder))
    assert family_of(back).variant_of(back) == variant
    for part in ("unet", "vae", *(spec.part for spec in fam.text_encoders)):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(back, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_conditioning_and_target_come_from_the_family(name, variant):
    from edtools.models import tiny_components
    from edtools.models.conditioning import encode_text, unet_conditioning

    components = tiny_components(variant)
    fam = family(variant)
    ids = [
        tok(["a cat"], padding="max_length", return_tensors="pt").input_ids for tok in components.tokenizers
    ]
    channels = components.vae.config.latent_channels
    with torch.no_grad():
        embeddings = encode_text(components, ids)
        kwargs = unet_conditioning(components, embeddings, torch.zeros(1, 6), device="cpu")
        latents = torch.randn(1, channels, 16, 16, generator=torch.Generator().manual_seed(0))
        noise = torch.ones_like(latents)
        noisy, timesteps = fam.noisy_input(components.noise_scheduler, latents, noise, torch.tensor([10]))
        out = fam.denoise(components.unet, noisy, timesteps, kwargs)
    assert out.shape == latents.shape
    assert ("added_cond_kwargs" in kwargs) == (name == "sdxl")
    assert ("pooled_projections" in kwargs) == (name in ("sd3", "flux"))
    assert ("guidance" in kwargs) == (variant == "flux-dev")
    target = fam.prediction_target(components.noise_scheduler, latents, noise, torch.tensor([10]))
    if name in ("sd3", "flux"):
        assert torch.equal(target, noise - latents)  # flow matching learns the velocity
    else:
        assert torch.equal(target, noise)  # epsilon models learn the noise
