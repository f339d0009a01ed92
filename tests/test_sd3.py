"""Stable Diffusion 3: tiny SD3 models, the flow-matching objective, LoRA training through the CLI whose file
diffusers' StableDiffusion3Pipeline loads, validation per concept, and stop + resume equal to one run."""

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
from edtools.models import load_components, make_pipeline, make_tiny_model, tiny_components  # noqa: E402
from edtools.models.families import family, family_of  # noqa: E402
from edtools.models.families.flow import flow_sigmas  # noqa: E402
from edtools.train import train  # noqa: E402


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sd3") / "model", "sd3")


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def diffusers_pipeline(model: Path):
    """diffusers' own StableDiffusion3Pipeline of a tiny folder (with its T5 when the folder has one)."""
    pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(str(model))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents_of(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipeline(
        "a photo of a cat",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=generator,
        output_type="latent",
    )
    return out.images.float()


# ---------------------------------------------------------------------------------------------------------
# The tiny model and the family


def test_tiny_sd3_folder_loads_as_the_sd3_family_and_in_diffusers(sd3_model):
    components = load_components(str(sd3_model))
    fam = family_of(components)
    assert fam.name == components.architecture == "sd3" and fam is family("sd3")
    assert components.prediction_type == "flow_matching"
    assert type(components.unet).__name__ == "SD3Transformer2DModel"
    assert components.vae.config.latent_channels == 16 and components.vae.config.shift_factor
    # every weight as made (CLIP-with-projection encoders keep their text_projection, in any transformers)
    made = tiny_components("sd3")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ours, saved = getattr(made, part).state_dict(), getattr(components, part).state_dict()
        assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in ours), part
    # T5 is optional: the tiny folder has it, a folder without it loads too (test_t5.py)
    assert {p.name for p in sd3_model.iterdir() if p.is_dir()} == {
        *fam.subfolders,
        "text_encoder_3",
        "tokenizer_3",
    }
    assert type(components.text_encoder_3).__name__ == "T5EncoderModel" and len(components.tokenizers) == 3
    # the other families do not claim SD3's parts
    assert [f.name for f in (family("sd1"), family("sdxl")) if f.matches_parts(components)] == []
    pipeline = diffusers_pipeline(sd3_model)
    ours = make_pipeline(components)
    assert type(ours) is type(pipeline) and type(ours.scheduler) is type(pipeline.scheduler)
    assert ours.scheduler is not components.noise_scheduler  # sampling never moves the training scheduler
    assert torch.equal(latents_of(ours), latents_of(pipeline))


def test_real_blocks_have_sd35s_second_attention_and_run():
    import inspect

    from edtools.models import tiny_components

    if "dual_attention_layers" not in inspect.signature(diffusers.SD3Transformer2DModel).parameters:
        pytest.skip("this diffusers predates SD3.5's transformer")

    components = tiny_components("sd3", real_blocks=True)
    blocks = components.unet.transformer_blocks
    assert blocks[0].attn2 is not None and getattr(blocks[1], "attn2", None) is None
    assert components.unet.config.qk_norm == "rms_norm" and components.unet.config.patch_size == 2
    from edtools.models.lora import add_lora, lora_parameters

    add_lora(components, rank=2)
    names = {n for n, _ in components.unet.named_modules() if n.endswith("lora_A")}
    assert any(".attn2.to_q." in n for n in names) and any(".attn.add_k_proj." in n for n in names)
    assert lora_parameters(components)
    fam = family_of(components)
    latents = torch.randn(1, 16, 8, 8)
    hidden, pooled = torch.randn(1, 77, 96), torch.randn(1, 64)
    from edtools.models.families.base import TextEmbeddings

    kwargs = fam.unet_conditioning(components, TextEmbeddings(hidden, pooled), None, device="cpu")
    assert kwargs["encoder_hidden_states"].shape[::2] == (1, 128)
    with torch.no_grad():
        out = fam.denoise(components.unet, latents, torch.tensor([500.0]), kwargs)
    assert out.shape == latents.shape


def test_model_indexes_of_sd3_and_others():
    from edtools.models.families import family_of_index

    sd3 = {"transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_2": ["transformers", "X"]}
    assert family_of_index(sd3, "m").name == "sd3"
    video = {"transformer": ["diffusers", "WanTransformer3DModel"], "text_encoder": ["transformers", "X"]}
    assert family_of_index(video, "m") is None
    from edtools.models.families import guess_family

    for hub_id in (
        "stabilityai/stable-diffusion-3-medium-diffusers",
        "stabilityai/stable-diffusion-3.5-large",
    ):
        assert guess_family(hub_id).name == "sd3"
    assert guess_family("stabilityai/stable-diffusion-xl-base-1.0").name == "sdxl"


def test_make_tiny_model_cli_writes_an_sd3_folder(tmp_path, capsys):
    assert main(["make-tiny-model", "--sd3", str(tmp_path / "m")]) == 0
    assert "tiny Stable Diffusion 3-shaped" in capsys.readouterr().out
    assert load_components(str(tmp_path / "m")).architecture == "sd3"


def test_flow_matching_objective(sd3_model):
    components = load_components(str(sd3_model))
    fam, scheduler = family_of(components), components.noise_scheduler
    sigmas, timesteps = flow_sigmas(scheduler.config)
    assert torch.equal(sigmas, scheduler.sigmas) and torch.equal(timesteps, scheduler.timesteps)
    generator = torch.Generator().manual_seed(3)
    positions = fam.training_positions(scheduler, 4096, generator)
    assert positions.dtype == torch.int64 and 0 <= positions.min() and positions.max() < 1000
    # logit-normal: the middle of the schedule far more often than its ends
    middle = ((positions >= 250) & (positions < 750)).float().mean()
    assert middle > 0.6
    again = fam.training_positions(scheduler, 4096, torch.Generator().manual_seed(3))
    assert torch.equal(positions, again)  # drawn from the generator alone
    latents, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    at = torch.tensor([0, 999])
    noisy, model_t = fam.noisy_input(scheduler, latents, noise, at)
    assert torch.equal(noisy[0], noise[0])  # position 0 is sigma 1: pure noise
    sigma = float(sigmas[999])
    assert torch.allclose(noisy[1], (1 - sigma) * latents[1] + sigma * noise[1])
    assert torch.equal(model_t, timesteps[at])
    assert torch.equal(fam.prediction_target(scheduler, latents, noise, at), noise - latents)
    assert fam.loss_weights(scheduler, at) is None  # the density weights the noise levels


def test_flow_settings_choose_the_density_the_weighting_and_the_shift(tree, sd3_model, tmp_path):
    from edtools.models.families.base import FlowSettings
    from edtools.train.setup import configure_noise

    components = load_components(str(sd3_model))
    fam, scheduler = family_of(components), components.noise_scheduler

    def middle_share(flow: FlowSettings) -> float:
        positions = fam.training_positions(scheduler, 4096, torch.Generator().manual_seed(0), flow)
        return float(((positions >= 250) & (positions < 750)).float().mean())

    assert abs(middle_share(FlowSettings(timestep_sampling="uniform")) - 0.5) < 0.05
    assert middle_share(FlowSettings(logit_std=0.3)) > middle_share(FlowSettings()) > 0.6
    low, high = (
        fam.training_positions(scheduler, 4096, torch.Generator().manual_seed(0), FlowSettings(logit_mean=m))
        for m in (-1.0, 1.0)
    )
    assert (
        low.float().mean() < 400 < 600 < high.float().mean()
    )  # diffusers' indexing: high positions, low noise
    assert middle_share(FlowSettings(timestep_sampling="mode")) != middle_share(
        FlowSettings(timestep_sampling="uniform")
    )
    at = torch.tensor([10, 500, 990])
    weights = fam.loss_weights(scheduler, at, FlowSettings(loss_weighting="sigma_sqrt"))
    sigmas, _ = flow_sigmas(scheduler.config)
    assert torch.allclose(weights, sigmas[at] ** -2)
    assert fam.loss_weights(scheduler, at, FlowSettings(loss_weighting="cosmap")).shape == (3,)

    configure_noise(components, train_config(tree({"a": 1}), sd3_model, tmp_path, flow_shift=1.0))
    shifted, _ = flow_sigmas(components.noise_scheduler.config)
    assert components.noise_scheduler.config.shift == 1.0
    assert torch.allclose(shifted, torch.linspace(1, 1000, 1000).flip(0) / 1000)  # shift 1: no shift
    assert float(sigmas[500]) > float(shifted[500])  # SD3's shift 3 trains at more noise


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_density_without_a_generator_argument_is_diffusers_own(monkeypatch, scheme):
    """Older diffusers (Colab's 0.30) take no generator: the same formulas then draw from ours."""
    import diffusers.training_utils as training_utils

    from edtools.models.families.base import FlowSettings
    from edtools.models.families.flow import _density

    flow = FlowSettings(timestep_sampling=scheme, logit_mean=0.3, logit_std=0.7, mode_scale=0.9)
    new = _density(flow, 64, torch.Generator().manual_seed(5))
    original = training_utils.compute_density_for_timestep_sampling

    def old(weighting_scheme, batch_size, logit_mean=None, logit_std=None, mode_scale=None):
        return original(weighting_scheme, batch_size, logit_mean, logit_std, mode_scale)

    monkeypatch.setattr(training_utils, "compute_density_for_timestep_sampling", old)
    assert torch.allclose(_density(flow, 64, torch.Generator().manual_seed(5)), new, atol=1e-7)


def test_conditioning_matches_the_pipeline_with_t5(sd3_model):
    """The training conditioning equals what StableDiffusion3Pipeline.encode_prompt gives: the padded CLIP
    states, then T5's at the tokenizer's length (24 tokens here; 256, the pipeline's default, for real models),
    a caption longer than that cut as the pipeline cuts it."""
    from edtools.data import token_ids
    from edtools.models.conditioning import encode_text, unet_conditioning
    from edtools.models.families.sd3 import t5_tokens

    components = load_components(str(sd3_model))
    captions = ["a photo of a cat", "a red dog " * 20]
    length = t5_tokens(components.tokenizer_3)
    assert length == 24
    with torch.no_grad():
        ids = [token_ids(tokenizer, captions) for tokenizer in components.tokenizers]
        kwargs = unet_conditioning(components, encode_text(components, ids), None, device="cpu")
        hidden, _, pooled, _ = make_pipeline(components).encode_prompt(
            captions, captions, captions, do_classifier_free_guidance=False, max_sequence_length=length
        )
    assert hidden.shape == (2, 77 + 24, 128) and hidden[:, 77:].abs().sum() > 0  # T5's tokens, not zeros
    assert torch.equal(kwargs["encoder_hidden_states"], hidden)
    assert torch.equal(kwargs["pooled_projections"], pooled)


def test_each_objective_refuses_the_others_settings(tree, sd3_model, tmp_path):
    from edtools.errors import EdtoolsError
    from edtools.train.setup import configure_noise

    root = tree({"a": 2})
    config = train_config(root, sd3_model, tmp_path / "out", min_snr_gamma=5.0, epochs=1)
    with pytest.raises(EdtoolsError, match="min_snr_gamma 5.0 do not apply"):
        train(config)
    for bad, message in (
        ({"logit_std": 0.0}, "logit_std is 0.0; it must be > 0"),
        ({"flow_shift": -1.0}, "flow_shift is -1.0"),
    ):
        with pytest.raises(EdtoolsError, match=message):
            train_config(root, sd3_model, tmp_path / "o", **bad)
    sd = make_tiny_model(tmp_path / "sd", "sd1")
    with pytest.raises(
        EdtoolsError, match="timestep_sampling mode, flow_shift 3.0: these settings are for flow"
    ):
        configure_noise(
            load_components(str(sd)),
            train_config(root, sd, tmp_path / "o2", timestep_sampling="mode", flow_shift=3.0),
        )


# ---------------------------------------------------------------------------------------------------------
# Training through the CLI and train()


@pytest.mark.slow
def test_lora_through_the_cli_loads_in_diffusers_like_the_trained_adapter(tree, sd3_model, tmp_path):
    from edtools.models.lora import add_lora, load_lora_state_dict, read_lora_file

    before = files_of(sd3_model)
    root = tree({"a": 3, "b": 3})
    out = tmp_path / "out"
    args = ["train", "--data-root", str(root), "--model", str(sd3_model), "--out", str(out)]
    args += ["--device", "cpu", "--resolution", "64", "--batch-size", "2", "--epochs", "2"]
    args += ["--lora-rank", "4", "--lora-alpha", "2", "--lora-lr", "3e-2", "--lora-text-encoder"]
    args += ["--validation-split", "0.34"]
    assert main(args) == 0
    assert files_of(sd3_model) == before  # the base model's files are never written

    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    lora_file = checkpoint / "lora.safetensors"
    tensors, metadata = read_lora_file(lora_file)
    assert {key.split(".")[0] for key in tensors} == {"transformer", "text_encoder", "text_encoder_2"}
    assert metadata["ss_base_model_version"] == "sd3" and metadata["ss_network_dim"] == "4"
    assert metadata["edtools_lora_alpha"] == "2.0" and metadata["modelspec.prediction_type"] == "flow"

    # the adapter as trained, from the resume state, in our own pipeline
    components = load_components(str(sd3_model))
    add_lora(components, rank=4, alpha=2, text_encoders=True)
    state = torch.load(checkpoint / "resume" / "state.pt", weights_only=True)["lora"]
    load_lora_state_dict(components, state)
    trained = latents_of(make_pipeline(components))

    pipeline = diffusers_pipeline(sd3_model)
    base = latents_of(pipeline)
    pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    loaded = latents_of(pipeline)
    change = (trained - base).abs().max()
    assert change > 1e-3  # the LoRA changes the output
    # the same change, up to the file's fp16 rounding of the adapter weights
    assert (loaded - trained).abs().max() < 0.02 * change

    with open(out / "validation.csv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    # before training and after each of the 2 epochs, for each concept: finite, and moved by training
    assert sorted((row["step"], row["concept"]) for row in rows) == sorted(
        (step, concept) for step in {row["step"] for row in rows} for concept in ("a", "b")
    )
    assert len(rows) == 6 and all(math.isfinite(float(row["loss"])) for row in rows)
    assert len({row["loss"] for row in rows if row["concept"] == "a"}) == 3
    assert (out / "bleed.csv").is_file()


@pytest.mark.slow
def test_sd3_lora_stop_and_resume_equals_the_uninterrupted_run(tree, sd3_model, tmp_path):
    root = tree({"a": 3, "b": 3}, sizes=((64, 64), (128, 64)))
    config = train_config(
        root,
        sd3_model,
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
    assert [e for e in events if e.kind == "sample"]  # samples from StableDiffusion3Pipeline, mid-run too
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
def test_full_fine_tune_writes_a_folder_the_sd3_pipeline_loads(tree, sd3_model, tmp_path):
    before = files_of(sd3_model)
    config = train_config(
        tree({"a": 2, "b": 2}),
        sd3_model,
        tmp_path / "out",
        epochs=1,
        train_text_encoder=False,
        cache_text_embeddings=True,
        gradient_checkpointing=True,
        flow_shift=2.0,
    )
    result = train(config)
    assert files_of(sd3_model) == before
    trained = diffusers_pipeline(Path(result.checkpoint))
    base = diffusers_pipeline(sd3_model)
    assert trained.scheduler.config.shift == 2.0  # the shift it was trained with
    assert type(trained.text_encoder_3).__name__ == "T5EncoderModel"  # a saved full fine-tune keeps T5
    changed = [
        name
        for name, value in trained.transformer.state_dict().items()
        if not torch.equal(value, base.transformer.state_dict()[name])
    ]
    assert changed and all(
        torch.equal(a, b)
        for a, b in zip(trained.text_encoder.parameters(), base.text_encoder.parameters(), strict=True)
    )
