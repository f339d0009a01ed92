"""T5-XXL in the SD3 family and the t5 setting: folders with and without T5, dropping it, loading it in 8-bit, and
freeing it once the captions are cached (samples, validation and bleed then read the cache)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import train_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edtools.config import ConfigError, TrainConfig  # noqa: E402
from edtools.errors import ModelError  # noqa: E402
from edtools.models import Keep, load_components, make_pipeline, make_tiny_model, tiny_components  # noqa: E402
from edtools.models.sd import save_components  # noqa: E402
from edtools.train import train  # noqa: E402

REQUIRED = {"data_root": "data", "model": "model", "out": "out"}
PROMPTS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sd3t5") / "model", "sd3")


@pytest.fixture(scope="module")
def sd3_without_t5(tmp_path_factory) -> Path:
    """A tiny SD3 folder saved without T5 (model_index.json: text_encoder_3 [null, null])."""
    components = dataclasses.replace(tiny_components("sd3"), text_encoder_3=None, tokenizer_3=None)
    return save_components(components, tmp_path_factory.mktemp("sd3no") / "model")


def latents(pipeline, **text) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipeline(
        **text,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=3.0,
        generator=generator,
        output_type="latent",
    )
    return out.images.float()


def test_the_setting_is_validated():
    assert TrainConfig(**REQUIRED).t5 == "load"
    with pytest.raises(ConfigError, match=r"t5.*'16bit'.*load, 8bit, drop"):
        TrainConfig(**REQUIRED, t5="16bit")
    with pytest.raises(ConfigError, match=r"t5 is '8bit'; an 8-bit T5 .*cache_text_embeddings true"):
        TrainConfig(**REQUIRED, t5="8bit", lora_rank=4, train_text_encoder=False)
    with pytest.raises(ConfigError, match=r"t5 is '8bit'; a full fine-tune saves .*lora_rank > 0"):
        TrainConfig(**REQUIRED, t5="8bit", cache_text_embeddings=True, train_text_encoder=False)
    ok = TrainConfig(**REQUIRED, t5="8bit", lora_rank=4, cache_text_embeddings=True, train_text_encoder=False)
    assert ok.t5 == "8bit"


def test_a_folder_without_t5_conditions_on_zero_tokens(sd3_without_t5):
    """[null, null] in model_index.json: no T5 loads, and the conditioning is the pipeline's without it."""
    from edtools.data import token_ids
    from edtools.models.conditioning import encode_text, unet_conditioning

    assert json.loads((sd3_without_t5 / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    components = load_components(str(sd3_without_t5))
    assert (
        components.text_encoder_3 is None and len(components.text_encoders) == len(components.tokenizers) == 2
    )
    with torch.no_grad():
        ids = [token_ids(tokenizer, PROMPTS) for tokenizer in components.tokenizers]
        kwargs = unet_conditioning(components, encode_text(components, ids), None, device="cpu")
        hidden, _, pooled, _ = make_pipeline(components).encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False
        )
    assert torch.equal(kwargs["encoder_hidden_states"], hidden)
    assert torch.equal(kwargs["pooled_projections"], pooled)
    assert hidden[:, 77:].abs().sum() == 0  # the T5 tokens are zeros


def test_drop_leaves_t5_out_and_other_families_refuse_the_setting(sd3_model, tmp_path):
    components = load_components(str(sd3_model), keep=Keep(t5="drop"))
    assert components.text_encoder_3 is None and components.tokenizer_3 is None
    flux = make_tiny_model(tmp_path / "flux", "flux-schnell")
    with pytest.raises(ModelError, match=r"t5 is 'drop', but Flux.1 models .* no mode without it"):
        load_components(str(flux), keep=Keep(t5="drop"))
    sd = make_tiny_model(tmp_path / "sd", "sd1")
    with pytest.raises(ModelError, match=r"t5 is '8bit', but .* has no T5 text encoder: set t5 load"):
        load_components(str(sd), keep=Keep(t5="8bit"))


def test_cached_embeddings_sample_as_the_pipeline_with_t5(sd3_model):
    """Samples after T5 is freed: the pipeline given the cached prompt and negative embeddings draws what it
    draws encoding the prompts with T5 itself (at the length training encodes)."""
    from edtools.models.conditioning import TextEmbeddingCache
    from edtools.models.families import family_of
    from edtools.models.families.sd3 import t5_tokens

    components = load_components(str(sd3_model))
    pipeline = make_pipeline(components)
    length = t5_tokens(components.tokenizer_3)
    encoded = latents(pipeline, prompt=PROMPTS, max_sequence_length=length)
    cache = TextEmbeddingCache()
    cache.fill(components, [*PROMPTS, ""])
    text = family_of(components).pipeline_embeddings(
        components, cache.get(PROMPTS), cache.get(["", ""]), device="cpu"
    )
    components.text_encoder_3 = components.tokenizer_3 = None  # freed: nothing may need it now
    assert torch.allclose(latents(make_pipeline(components), **text), encoded, atol=1e-5)


def test_8bit_needs_a_gpu(tree, sd3_model, tmp_path, monkeypatch):
    from edtools.models import quantize

    monkeypatch.setattr(quantize, "cuda_present", lambda: False)
    config = train_config(
        tree({"a": 2}),
        sd3_model,
        tmp_path / "out",
        lora_rank=4,
        t5="8bit",
        cache_text_embeddings=True,
        train_text_encoder=False,
    )
    with pytest.raises(ConfigError, match=r"t5 is '8bit': the T5 encoder is loaded in 8-bit .* CUDA GPU"):
        train(config)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_lora_with_an_8bit_t5_caches_frees_it_samples_and_validates(tree, sd3_model, tmp_path, monkeypatch):
    """The real int8 load (bitsandbytes runs LLM.int8 on the CPU; only edtools' CUDA gate is lifted): T5's
    Linear layers are int8, the captions, sample prompts and bleed prompts are cached, T5 is freed before the
    first step, and samples, validation and bleed run without it."""
    pytest.importorskip("bitsandbytes")
    from edtools.models import quantize
    from edtools.train import setup

    monkeypatch.setattr(quantize, "cuda_present", lambda: True)
    seen = {}
    fill = setup.fill_text_cache

    def spy(components, captions, config, runtime):
        t5 = components.text_encoder_3
        linear = t5.encoder.block[0].layer[0].SelfAttention.q
        seen["before"] = (type(linear).__name__, linear.weight.dtype)
        cache = fill(components, captions, config, runtime)
        seen["after"] = (components.text_encoder_3, components.tokenizer_3, cache.freed)
        return cache

    monkeypatch.setattr("edtools.train.loop.fill_text_cache", spy)
    config = train_config(
        tree({"a": 2, "b": 2}),
        sd3_model,
        tmp_path / "out",
        epochs=1,
        lora_rank=4,
        t5="8bit",
        cache_text_embeddings=True,
        train_text_encoder=False,
        validation_split=0.5,
        sample_prompts=("a photo of a cat",),
        sample_steps=2,
    )
    events = []
    result = train(config, events.append)
    assert seen["before"] == ("Linear8bitLt", torch.int8)
    assert seen["after"] == (None, None, ("text_encoder_3",))
    assert [e for e in events if e.kind == "sample"] and [e for e in events if e.kind == "validation"]
    assert (tmp_path / "out" / "bleed.csv").is_file() and result.global_step > 0


def test_a_lora_run_caching_captions_places_the_denoiser_after_them(tree, sd3_model, tmp_path):
    """kept_as leaves an unquantised LoRA denoiser on the CPU while the captions are encoded (Keep.later), a full
    fine-tune's goes at once; Keep.place moves every other part."""
    from edtools.train.runtime import make_runtime
    from edtools.train.setup import kept_as

    root = tree({"a": 1})
    lora = train_config(
        root, sd3_model, tmp_path / "o", lora_rank=4, cache_text_embeddings=True, train_text_encoder=False
    )
    full = dataclasses.replace(lora, lora_rank=0)
    runtime = make_runtime(lora)
    assert kept_as(lora, runtime).later == {"unet"} and kept_as(full, runtime).later == set()
    assert kept_as(dataclasses.replace(lora, cache_text_embeddings=False), runtime).later == set()
    keep = Keep(device="meta", later=frozenset({"unet"}))
    waits, moves = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert keep.place(waits, "unet").weight.device.type == "cpu"
    assert keep.place(moves, "vae").weight.device.type == "meta"
