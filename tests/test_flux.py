"""Flux.1: tiny dev and schnell models, packed latents and T5 + CLIP conditioning as FluxPipeline's, LoRA training
through the CLI whose file diffusers' FluxPipeline loads, validation per concept, and stop + resume equal to one run."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest
from conftest import train_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edtools.cli import main  # noqa: E402
from edtools.errors import EdtoolsError  # noqa: E402
from edtools.models import load_components, make_pipeline, make_tiny_model, tiny_components  # noqa: E402
from edtools.models.conditioning import encode_text, unet_conditioning  # noqa: E402
from edtools.models.families import family, family_of, family_of_index, guess_family  # noqa: E402
from edtools.models.families.flow import flow_sigmas  # noqa: E402
from edtools.models.families.flux import pack_latents, unpack_latents  # noqa: E402
from edtools.train import train  # noqa: E402


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("flux") / "model", "flux-dev")


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def diffusers_pipeline(model: Path):
    pipeline = diffusers.FluxPipeline.from_pretrained(str(model))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents_of(pipeline) -> torch.Tensor:
    out = pipeline(
        "a photo of a cat",
        num_inference_steps=3,
        height=64,
        width=64,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return out.images.float()


# ---------------------------------------------------------------------------------------------------------
# The tiny model and the family


def test_tiny_flux_folder_loads_as_the_flux_family_and_in_diffusers(flux_model):
    components = load_components(str(flux_model))
    fam = family_of(components)
    assert fam.name == components.architecture == "flux" and fam is family("flux-schnell")
    assert fam.variant_of(components) == "flux-dev" and components.prediction_type == "flow_matching"
    assert type(components.text_encoder_2).__name__ == "T5EncoderModel"
    assert {p.name for p in flux_model.iterdir() if p.is_dir()} == set(fam.subfolders)
    schnell = tiny_components("flux-schnell")
    assert fam.variant_of(schnell) == "flux-schnell" and not schnell.unet.config.guidance_embeds
    pipeline = diffusers_pipeline(flux_model)
    assert type(pipeline.transformer).__name__ == "FluxTransformer2DModel"
    assert torch.isfinite(latents_of(pipeline)).all()


def test_model_indexes_and_hub_names_tell_flux():
    flux = {"transformer": ["diffusers", "FluxTransformer2DModel"], "text_encoder_2": ["transformers", "T5"]}
    assert family_of_index(flux, "m").name == "flux"
    sd3 = {"transformer": ["diffusers", "SD3Transformer2DModel"]}
    assert family_of_index(sd3, "m").name == "sd3"
    for hub_id in ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"):
        assert guess_family(hub_id).name == "flux"


def test_packing_is_flux_pipelines_and_undoes_itself():
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    packed = pack_latents(latents)
    assert torch.equal(packed, diffusers.FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert packed.shape == (2, 4 * 6, 64) and torch.equal(unpack_latents(packed, 8, 12), latents)


def test_conditioning_is_the_pipelines_and_the_prediction_its_transformers(flux_model):
    """The text embeddings are what FluxPipeline.encode_prompt gives; the family's denoise is the pipeline's
    transformer call on packed latents (the same velocity for the same input)."""
    components = load_components(str(flux_model))
    pipeline = make_pipeline(components)
    prompts = ["a photo of zqx", "a red dog"]
    ids = [
        tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        for tok in components.tokenizers
    ]
    embeddings = encode_text(components, [i.input_ids for i in ids])
    prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
        prompts, prompt_2=prompts, max_sequence_length=32
    )
    assert torch.allclose(embeddings.hidden, prompt_embeds, atol=1e-6)
    assert torch.allclose(embeddings.pooled, pooled, atol=1e-6)

    fam = family_of(components)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([700.0, 250.0])
    conditioning = unet_conditioning(components, embeddings, None, device="cpu")
    assert conditioning["guidance"].tolist() == [1.0, 1.0]  # dev trains with guidance 1
    with torch.no_grad():
        ours = fam.denoise(components.unet, latents, timesteps, conditioning)
        image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        if image_ids.shape[-2] != 16:  # diffusers 0.30 counts the latent side before packing
            image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
        theirs = components.unet(
            hidden_states=diffusers.FluxPipeline._pack_latents(latents, 2, 16, 8, 8),
            timestep=timesteps / 1000,
            guidance=torch.full((2,), 1.0),
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
    assert ours.shape == latents.shape
    assert torch.allclose(pack_latents(ours), theirs, atol=1e-5)


def test_training_noise_levels_are_unshifted_where_sampling_shifts_by_size(flux_model):
    components = load_components(str(flux_model))
    config = components.noise_scheduler.config
    assert config.use_dynamic_shifting
    sigmas, timesteps = flow_sigmas(config)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    assert torch.equal(sigmas, scheduler.sigmas) and torch.equal(timesteps, scheduler.timesteps)
    t = torch.arange(1000, 0, -1) / 1000
    assert torch.allclose(sigmas, t)  # unshifted, though the config's shift is 3


def test_settings_flux_cannot_take_are_refused_with_a_message(tree, flux_model, tmp_path):
    root = tree({"a": 2, "b": 2})
    with pytest.raises(
        EdtoolsError, match="flow_shift is 3.0, but the model .* shifts its noise levels by image"
    ):
        train(train_config(root, flux_model, tmp_path / "o1", flow_shift=3.0, lora_rank=4))
    with pytest.raises(EdtoolsError, match="train_text_encoder_2 is true, but Flux.1 models have no second"):
        train(train_config(root, flux_model, tmp_path / "o2", train_text_encoder_2=True))


def test_make_tiny_model_cli_writes_a_flux_folder(tmp_path, capsys):
    assert main(["make-tiny-model", "--flux", str(tmp_path / "m")]) == 0
    components = load_components(str(tmp_path / "m"))
    assert components.architecture == "flux" and components.unet.config.guidance_embeds


# ---------------------------------------------------------------------------------------------------------
# Training through the CLI and train()


@pytest.mark.slow
def test_lora_through_the_cli_loads_in_diffusers_like_the_trained_adapter(tree, flux_model, tmp_path):
    from edtools.models.lora import add_lora, load_lora_state_dict, read_lora_file

    before = files_of(flux_model)
    root = tree({"a": 3, "b": 3})
    out = tmp_path / "out"
    args = ["train", "--data-root", str(root), "--model", str(flux_model), "--out", str(out)]
    args += ["--device", "cpu", "--resolution", "64", "--batch-size", "2", "--epochs", "2"]
    args += ["--lora-rank", "4", "--lora-alpha", "2", "--lora-lr", "3e-2", "--lora-text-encoder"]
    args += ["--validation-split", "0.34"]
    assert main(args) == 0
    assert files_of(flux_model) == before  # the base model's files are never written

    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    lora_file = checkpoint / "lora.safetensors"
    tensors, metadata = read_lora_file(lora_file)
    assert {key.split(".")[0] for key in tensors} == {"transformer", "text_encoder"}  # T5 is never adapted
    assert any(".single_transformer_blocks." in key for key in tensors)
    assert metadata["ss_base_model_version"] == "flux1" and metadata["ss_network_dim"] == "4"
    assert (
        metadata["modelspec.architecture"] == "flux-1-dev/lora"
        and metadata["modelspec.prediction_type"] == "flow"
    )

    components = load_components(str(flux_model))
    add_lora(components, rank=4, alpha=2, text_encoders=True)
    state = torch.load(checkpoint / "resume" / "state.pt", weights_only=True)["lora"]
    load_lora_state_dict(components, state)
    trained = latents_of(make_pipeline(components))

    pipeline = diffusers_pipeline(flux_model)
    base = latents_of(pipeline)
    pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    loaded = latents_of(pipeline)
    change = (trained - base).abs().max()
    assert change > 1e-3  # the LoRA changes the output
    assert (loaded - trained).abs().max() < 0.02 * change  # the same change, up to the file's fp16 rounding

    with open(out / "validation.csv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 and {row["concept"] for row in rows} == {"a", "b"}
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    assert len({row["loss"] for row in rows if row["concept"] == "a"}) == 3  # training moved it
    assert (out / "bleed.csv").is_file()


@pytest.mark.slow
def test_flux_lora_stop_and_resume_equals_the_uninterrupted_run(tree, flux_model, tmp_path):
    root = tree({"a": 3, "b": 3}, sizes=((64, 64), (128, 64)))
    config = train_config(
        root,
        flux_model,
        tmp_path / "whole",
        lora_rank=4,
        lora_dropout=0.1,
        flip_p=0.5,
        grad_accum=2,
        cache_text_embeddings=True,
        train_text_encoder=False,
        timestep_sampling="mode",
        flow_loss_weighting="cosmap",
        sample_prompts=("a photo of a cat",),
        sample_steps=2,
        sample_every_steps=1,
    )
    events = []
    whole = train(config, events.append)
    assert [e for e in events if e.kind == "sample"]  # samples from FluxPipeline, mid-run too
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    first = train(dataclasses.replace(parts, max_steps=1))
    assert first.stop_reason == "max_steps"
    last = train(dataclasses.replace(parts, resume=True))
    assert last.global_step == whole.global_step

    state_a = torch.load(Path(whole.checkpoint) / "resume" / "state.pt", weights_only=True)["lora"]
    state_b = torch.load(Path(last.checkpoint) / "resume" / "state.pt", weights_only=True)["lora"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert any(v.abs().sum() > 0 for k, v in state_a.items() if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_schnell_trains_without_a_guidance_input(tree, tmp_path):
    model = make_tiny_model(tmp_path / "schnell", "flux-schnell")
    result = train(train_config(tree({"a": 2, "b": 2}), model, tmp_path / "out", epochs=1, lora_rank=4))
    assert result.global_step == 2 and math.isfinite(result.last_loss)


def test_every_lora_key_is_one_comfyui_maps_onto_a_weight_of_the_original_layout(tmp_path):
    """ComfyUI (and Forge, which shares its loader) applies a "transformer.<diffusers module>" LoRA key where
    its Flux key map (ported in flux_layout) maps <module>.weight to an original weight, or to rows of a fused
    one: every key edtools writes must resolve so, with lora_B's rows the rows it updates."""
    from flux_layout import key_map, original_state_dict

    from edtools.models.lora import add_lora, read_lora_file, save_lora_file

    components = tiny_components("flux-dev", real_blocks=True)
    original = original_state_dict(components.unet)
    mapping = key_map(components.unet.config)
    add_lora(components, rank=4, alpha=4, text_encoders=True, seed=1)
    path = save_lora_file(components, tmp_path / "lora.safetensors")
    tensors, _ = read_lora_file(path)
    transformer_keys = [k for k in tensors if k.startswith("transformer.")]
    assert len(transformer_keys) == 2 * len(
        [n for n, m in components.unet.named_modules() if hasattr(m, "lora_A")]
    )
    for key in transformer_keys:
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        target, offset, rows = mapping[f"{module}.weight"]
        weight = original[target]
        if kind == "B.weight":
            assert tensors[key].shape[0] == (rows if offset is not None else weight.shape[0]), key
        else:
            assert tensors[key].shape[1] == weight.shape[1], key
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in transformer_keys}
    assert any(m.startswith("single_transformer_blocks.") and m.endswith("proj_mlp") for m in modules)
    # text encoder keys in the diffusers form ComfyUI's CLIP map reads: text_encoder.text_model.encoder.layers.N.*
    text_keys = [k for k in tensors if not k.startswith("transformer.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
