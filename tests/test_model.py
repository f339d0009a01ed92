"""The tiny model is a real diffusers SD folder; loading is offline; saving is complete, exact and atomic.

Everything runs on CPU with randomly initialised tiny models built in code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safe_open = pytest.importorskip("safetensors").safe_open

from single_file_cases import differing  # noqa: E402

from edtools.errors import ModelError  # noqa: E402
from edtools.models import (  # noqa: E402
    SDComponents,
    load_components,
    make_pipeline,
    make_tiny_model,
    save_components,
    tiny_components,
)
from edtools.models.sd import _prefix_text_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {p: make_tiny_model(root / p, prediction_type=p) for p in ("epsilon", "v_prediction")}


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a: SDComponents, b: SDComponents) -> None:
    assert a.architecture == b.architecture
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if a.architecture == "sdxl" else ()):
        sa, sb = state(getattr(a, name)), state(getattr(b, name))
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_tiny_model_folder_is_a_stable_diffusion_pipeline(tiny_models):
    folder = tiny_models["epsilon"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for sub in ("unet", "vae", "text_encoder"):
        assert list((folder / sub).glob("*.safetensors")), sub
        assert not list((folder / sub).glob("*.bin")), sub


def test_diffusers_loads_the_tiny_model_and_generates_an_image(tiny_models):
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(tiny_models["epsilon"])
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_load_components_offline_with_the_models_prediction_type(tiny_models, prediction_type):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    components = load_components(str(tiny_models[prediction_type]))
    assert isinstance(components.noise_scheduler, diffusers.DDPMScheduler)
    assert components.noise_scheduler.config.prediction_type == prediction_type
    assert components.prediction_type == prediction_type
    assert isinstance(components.unet, diffusers.UNet2DConditionModel)
    assert isinstance(components.vae, diffusers.AutoencoderKL)
    assert components.unet.dtype == torch.float32
    assert components.text_encoder.config.hidden_size == 32
    assert components.text_encoder.config.num_hidden_layers == 2


def test_load_components_dtype(tiny_models):
    components = load_components(str(tiny_models["epsilon"]), dtype=torch.bfloat16)
    for module in (components.unet, components.vae, components.text_encoder):
        assert next(module.parameters()).dtype == torch.bfloat16


def test_tokenizer_pads_captions_to_model_max_length(tiny_models):
    tokenizer = load_components(str(tiny_models["epsilon"])).tokenizer
    assert tokenizer.model_max_length == 77
    caption = "a photo of a red cat, painting style"
    ids = tokenizer(
        [caption, "x"], padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    ).input_ids
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert ids[:, 0].tolist() == [tokenizer.bos_token_id] * 2
    assert ids[1, 1:].tolist() == [tokenizer.convert_tokens_to_ids("x</w>")] + [tokenizer.eos_token_id] * 75
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == caption.replace(",", " ,")
    assert "photo</w>" in tokenizer.convert_ids_to_tokens(ids[0])  # whole-word merges work
    long_ids = tokenizer("cat " * 200, truncation=True, max_length=77).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == tokenizer.eos_token_id


def test_tiny_model_shapes_match_stable_diffusion(tiny_models):
    components = load_components(str(tiny_models["epsilon"]))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = components.vae.encode(pixels).latent_dist.mode()
        assert latents.shape == (2, 4, 8, 8)  # downsample factor 8, like SD
        ids = components.tokenizer(["a cat", "a dog"], padding="max_length", return_tensors="pt").input_ids
        hidden = components.text_encoder(ids)[0]
        assert hidden.shape == (2, 77, 32)
        out = components.unet(latents, torch.tensor([10, 900]), hidden).sample
    assert out.shape == latents.shape
    assert sum(p.numel() for p in components.unet.parameters()) < 1_000_000


def test_tiny_model_is_seeded(tmp_path):
    a = tiny_components(seed=1)
    b = tiny_components(seed=1)
    c = tiny_components(seed=2)
    assert_same_weights(a, b)
    assert not torch.equal(next(a.unet.parameters()), next(c.unet.parameters()))
    before = torch.random.get_rng_state()
    tiny_components(seed=3)
    assert torch.equal(before, torch.random.get_rng_state())  # global generator untouched


def test_save_then_load_gives_identical_weights(tmp_path):
    components = tiny_components(seed=4, prediction_type="v_prediction")
    with torch.no_grad():  # weights a fresh build would not have
        for module in (components.unet, components.vae, components.text_encoder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    out = save_components(components, tmp_path / "checkpoint")
    assert out == (tmp_path / "checkpoint").resolve()
    reloaded = load_components(str(out))
    assert_same_weights(components, reloaded)
    assert reloaded.prediction_type == "v_prediction"
    assert list(reloaded.noise_scheduler.alphas_cumprod) == list(components.noise_scheduler.alphas_cumprod)
    assert leftovers(tmp_path, "checkpoint") == []


def test_save_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "checkpoint"
    save_components(tiny_components(seed=5), out)
    (out / "stale.txt").write_text("from the older save")
    newer = tiny_components(seed=6)
    save_components(newer, out)
    assert_same_weights(newer, load_components(str(out)))
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path, "checkpoint") == []


def test_folders_have_the_hubs_file_layout_that_every_transformers_reads(tmp_path):
    # transformers 5 alone writes CLIPTextModel weights without text_model. and only tokenizer.json: 4.x then
    # loads random text encoder weights and no tokenizer (test_folder_compat loads folders in both versions).
    components = tiny_components("sdxl", seed=10)
    folder = save_components(components, tmp_path / "checkpoint")
    for name, module in (
        ("text_encoder", components.text_encoder),
        ("text_encoder_2", components.text_encoder_2),
    ):
        expected = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
        with safe_open(str(folder / name / "model.safetensors"), framework="pt") as file:
            assert file.metadata() == {"format": "pt"}
            assert all(k.startswith("text_model.") for k in file.keys() if k != "text_projection.weight")  # noqa: SIM118
            written = {k.removeprefix("text_model."): file.get_tensor(k) for k in file.keys()}  # noqa: SIM118
        assert differing(expected, written) == [], name
    for name in ("tokenizer", "tokenizer_2"):
        assert (folder / name / "vocab.json").is_file() and (folder / name / "merges.txt").is_file(), name
    assert_same_weights(components, load_components(str(folder)))
    assert leftovers(folder / "text_encoder", "model.safetensors") == []


def test_a_sharded_text_encoder_is_renamed_in_each_file_and_the_index(tmp_path):
    text_encoder = tiny_components(seed=11).text_encoder
    text_encoder.save_pretrained(tmp_path, max_shard_size="50KB")
    _prefix_text_model(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all(name.startswith("text_model.") for name in index["weight_map"])
    for path in tmp_path.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as file:
            assert all(name.startswith("text_model.") for name in file.keys())  # noqa: SIM118
    assert differing(text_encoder, transformers.CLIPTextModel.from_pretrained(tmp_path)) == []


def test_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    original = diffusers.StableDiffusionPipeline.save_pretrained

    def save_then_fail(self, directory, **kwargs):
        original(self, directory, **kwargs)
        (Path(directory) / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        raise OSError("disk full")

    components = tiny_components(seed=7)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_components(components, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert leftovers(tmp_path, "fresh") == []

    # An existing checkpoint survives a failed overwrite, complete.
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_pretrained", original)
    save_components(components, tmp_path / "kept")
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_components(tiny_components(seed=8), tmp_path / "kept")
    assert_same_weights(components, load_components(str(tmp_path / "kept")))
    assert leftovers(tmp_path, "kept") == []


def test_make_pipeline_shares_the_training_modules():
    components = tiny_components(seed=9, prediction_type="v_prediction")
    pipeline = make_pipeline(components)
    assert pipeline.unet is components.unet
    assert pipeline.text_encoder is components.text_encoder
    assert pipeline.vae is components.vae
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert list(pipeline.scheduler.alphas_cumprod) == list(components.noise_scheduler.alphas_cumprod)
    image = pipeline("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_not_a_diffusers_folder_says_what_is_missing(tmp_path, tiny_models):
    with pytest.raises(ValueError, match="model_index.json"):
        load_components(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["epsilon"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match="lacks vae/"):
        load_components(str(broken))
    video = tmp_path / "wan"
    video.mkdir()
    (video / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]})
    )
    with pytest.raises(ModelError, match="WanPipeline model; edtools trains Stable Diffusion 1.x/2.x, SDXL"):
        load_components(str(video))
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    (refiner / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLImg2ImgPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": [None, None],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            }
        )
    )
    with pytest.raises(ModelError, match="SDXL refiner"):
        load_components(str(refiner))
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_components(str(broken))
    with pytest.raises(ModelError, match="neither an existing folder or file nor a hub id"):
        load_components(str(tmp_path / "no" / "such" / "model"))


def test_uncached_hub_id_offline_is_an_actionable_error():
    with pytest.raises(ModelError, match="could not load"):
        load_components("edtools-tests/no-such-model")


def test_make_tiny_model_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="prediction_type"):
        make_tiny_model(tmp_path / "m", prediction_type="sample")
    with pytest.raises(ValueError, match="sample_size"):
        make_tiny_model(tmp_path / "m", sample_size=0)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("real_blocks", [False, True])
def test_tiny_architectures_save_load_and_generate(tmp_path, architecture, real_blocks):
    folder = make_tiny_model(tmp_path / "m", architecture, real_blocks=real_blocks)
    index = json.loads((folder / "model_index.json").read_text())
    sdxl = architecture == "sdxl"
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    components = load_components(str(folder))
    assert components.architecture == ("sdxl" if sdxl else "sd")
    assert len(components.text_encoders) == len(components.tokenizers) == (2 if sdxl else 1)
    if sdxl:
        assert type(components.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert components.tokenizer_2.pad_token == "!" and components.tokenizer.pad_token == "<|endoftext|>"
        assert components.unet.config.addition_embed_type == "text_time"
        assert components.vae.config.force_upcast and components.vae.config.scaling_factor == 0.13025
    levels = len(components.unet.config.block_out_channels)
    assert levels == {("sd1", True): 4, ("sd2", True): 4, ("sdxl", True): 3}.get(
        (architecture, real_blocks), 2
    )
    assert components.unet.config.use_linear_projection == (architecture != "sd1")
    assert components.text_encoder.config.hidden_act == ("gelu" if architecture == "sd2" else "quick_gelu")
    assert_same_weights(components, tiny_components(architecture, real_blocks=real_blocks))
    pipeline = make_pipeline(components)
    image = pipeline("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0
