"""SDXL and LoRA runs through train(): the checkpoints load in diffusers' own pipelines, cached text embeddings
train like fresh ones, and a run stopped and resumed equals the uninterrupted run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import train_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edtools.models import load_components, make_tiny_model  # noqa: E402
from edtools.train import train  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sdxl") / "model", "sdxl")


make_config = train_config


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def moved(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sdxl_full_fine_tune_trains_both_text_encoders_and_loads_in_the_sdxl_pipeline(
    tree, sdxl_model, tmp_path
):
    root = tree({"a": 3, "b": 2}, sizes=((96, 64), (64, 64)))
    config = make_config(
        root, sdxl_model, tmp_path / "out", sample_prompts=("a photo of a cat",), sample_steps=2
    )
    events = []
    result = train(config, events.append)
    assert result.stop_reason == "finished" and result.global_step > 0
    base, trained = load_components(str(sdxl_model)), load_components(result.checkpoint)
    assert trained.architecture == "sdxl"
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert moved(state(getattr(base, name)), state(getattr(trained, name))), name
    assert not moved(state(base.vae), state(trained.vae))
    pipeline = diffusers.StableDiffusionXLPipeline.from_pretrained(result.checkpoint)
    image = pipeline("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert [e for e in events if e.kind == "sample"]


@pytest.mark.slow
def test_sdxl_with_frozen_cached_text_encoders_matches_fresh_encoding(tree, sdxl_model, tmp_path):
    root = tree({"a": 3, "b": 2})
    config = make_config(root, sdxl_model, tmp_path / "fresh", epochs=1, train_text_encoder=False)
    fresh = train(config)
    cached = train(dataclasses.replace(config, out=str(tmp_path / "cached"), cache_text_embeddings=True))
    a, b = load_components(fresh.checkpoint), load_components(cached.checkpoint)
    base = load_components(str(sdxl_model))
    assert not moved(state(base.text_encoder_2), state(b.text_encoder_2))  # frozen
    assert moved(state(base.unet), state(b.unet))
    for key, value in state(a.unet).items():  # the same training, up to float rounding of batched encoding
        torch.testing.assert_close(state(b.unet)[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sdxl_stop_and_resume_equals_the_uninterrupted_run(tree, sdxl_model, tmp_path):
    root = tree({"a": 3, "b": 3}, sizes=((64, 64), (128, 64)))
    config = make_config(root, sdxl_model, tmp_path / "whole", center_crop=False, flip_p=0.5)
    whole = train(config)
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    first = train(dataclasses.replace(parts, max_steps=2))
    assert first.stop_reason == "max_steps" and first.global_step == 2
    last = train(dataclasses.replace(parts, resume=True))
    assert last.global_step == whole.global_step
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = (
            state(getattr(load_components(whole.checkpoint), name)),
            state(getattr(load_components(last.checkpoint), name)),
        )
        assert not moved(a, b), name


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sample(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = pipeline("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=generator)
    return torch.from_numpy(
        images.images[0] if not hasattr(images.images[0], "size") else _np(images.images[0])
    )


def _np(image):
    import numpy as np

    return np.asarray(image, dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_lora_run_writes_kohya_files_that_diffusers_loads_and_leaves_the_base_model_alone(
    tree, tiny_model, sdxl_model, tmp_path, architecture
):
    model = sdxl_model if architecture == "sdxl" else tiny_model
    before = files_of(model)
    root = tree({"a": 3, "b": 2})
    config = make_config(
        root,
        model,
        tmp_path / "out",
        lora_rank=4,
        lora_lr=1e-2,
        lora_text_encoder=True,
        train_text_encoder=False,
        save_single_file=True,
        sample_prompts=("a photo of a cat",),
        sample_steps=2,
    )
    events = []
    result = train(config, events.append)
    assert files_of(model) == before  # the base model's files are never written
    checkpoint = Path(result.checkpoint)
    lora_file = checkpoint / "lora.safetensors"
    beside = checkpoint.with_name(checkpoint.name + ".safetensors")
    assert lora_file.is_file() and beside.read_bytes() == lora_file.read_bytes()
    assert not (checkpoint / "unet").exists()  # a LoRA checkpoint holds the adapters, not the model

    from edtools.models.lora import read_lora_file

    tensors, metadata = read_lora_file(lora_file)
    prefixes = {key.split("_")[1] for key in tensors}
    assert prefixes == ({"unet", "te1", "te2"} if architecture == "sdxl" else {"unet", "te"})
    assert metadata["ss_network_dim"] == "4" and metadata["edtools.global_step"] == str(result.global_step)
    assert '"concept": "a"' in metadata["edtools.concepts"]

    pipeline_class = (
        diffusers.StableDiffusionXLPipeline if architecture == "sdxl" else diffusers.StableDiffusionPipeline
    )
    pipeline = pipeline_class.from_pretrained(str(model))
    pipeline.set_progress_bar_config(disable=True)
    base = sample(pipeline)
    pipeline.load_lora_weights(str(lora_file))
    assert not torch.allclose(sample(pipeline), base)  # the LoRA changes diffusers' output
    assert [e for e in events if e.kind == "sample"]


@pytest.mark.slow
def test_lora_stop_and_resume_equals_the_uninterrupted_run(tree, tiny_model, tmp_path):
    root = tree({"a": 3, "b": 3}, sizes=((64, 64), (128, 64)))
    config = make_config(
        root,
        tiny_model,
        tmp_path / "whole",
        lora_rank=4,
        lora_dropout=0.1,
        lora_text_encoder=True,
        flip_p=0.5,
    )
    whole = train(config)
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    first = train(dataclasses.replace(parts, max_steps=2))
    assert first.stop_reason == "max_steps"
    with pytest.raises(Exception, match="lora_rank: checkpoint 4, now 8"):
        train(dataclasses.replace(parts, resume=True, lora_rank=8))
    last = train(dataclasses.replace(parts, resume=True))
    assert last.global_step == whole.global_step

    from edtools.models.lora import read_lora_file

    a, _ = read_lora_file(Path(whole.checkpoint) / "lora.safetensors")
    b, _ = read_lora_file(Path(last.checkpoint) / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(Path(whole.checkpoint) / "resume" / "state.pt", weights_only=True)["lora"]
    state_b = torch.load(Path(last.checkpoint) / "resume" / "state.pt", weights_only=True)["lora"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize("cached_text", [False, True], ids=["text-encoders-train", "cached-text"])
def test_an_empty_batch_under_ddp_runs_a_stand_in_that_adds_nothing(
    tree, sdxl_model, tmp_path, monkeypatch, cached_text
):
    """A rank whose every image failed to decode must still run the model forward and backward (the other
    ranks' backward all-reduces gradients): an SDXL stand-in (time ids, both tokenizers, the text cache) whose
    gradients are all zero and which counts no image."""
    import os

    import edtools.train.step as step_module
    from edtools.balance.schedule import build_epoch
    from edtools.data import ScheduleBatches
    from edtools.dataset.scan import load_dataset, scan
    from edtools.models.conditioning import TextEmbeddingCache
    from edtools.train import make_lr_scheduler, make_optimizer, prepare_modules, step_generator, train_step
    from edtools.train.setup import make_latent_cache

    root = tree({"a": 2})
    scan(root)  # the manifest knows the images: one fails only when its batch decodes it
    image = root / "a" / "a_000.png"
    stat = image.stat()
    image.write_bytes(b"\0" * stat.st_size)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    config = make_config(root, sdxl_model, tmp_path / "out", batch_size=1, train_text_encoder=not cached_text)
    components = load_components(str(sdxl_model))
    params = prepare_modules(components, config, "cpu")
    optimizer = make_optimizer(config, params)
    dataset = load_dataset(root)
    schedule = build_epoch(dataset, epoch=0, seed=config.seed, batch_size=1, resolution=64)
    batches = ScheduleBatches(dataset, schedule, components.tokenizers, seed=config.seed)
    empty, good = sorted((batches[0], batches[1]), key=lambda batch: len(batch["image_index"]))
    assert len(empty["image_index"]) == 0 and empty["skipped_images"][0][0] == "a/a_000.png"
    text_cache = None
    if cached_text:
        text_cache = TextEmbeddingCache()
        text_cache.fill(components, good["captions"])

    def step(batch: dict):
        return train_step(
            components,
            optimizer,
            batch,
            config=config,
            lr_scheduler=make_lr_scheduler(config, optimizer, 10),
            scaler=None,
            latent_cache=make_latent_cache(config, components),
            generator=step_generator(0, 0, 0, 0),
            sync=False,  # the group's gradients are kept, not stepped: they can be looked at
            text_cache=text_cache,
        )

    monkeypatch.setattr(step_module, "_distributed", lambda: True)  # one rank among several
    step(good)
    reached = [p.grad is not None for p in params]  # a real image's backward reaches these
    assert sum(reached) > len(params) // 2
    optimizer.zero_grad(set_to_none=True)
    result = step(empty)
    assert result.per_sample.numel() == 0 and result.loss == 0.0 and not result.nonfinite
    assert [p.grad is not None for p in params] == reached  # the stand-in reaches every one of them too
    assert all(torch.count_nonzero(p.grad) == 0 for p in params if p.grad is not None)
    trained_text = any(p.requires_grad for p in components.text_encoder.parameters())
    assert trained_text is not cached_text
    if cached_text:
        assert "" in text_cache._store  # the stand-in's empty caption, encoded once by the frozen encoders
