"""Each training option does what it says, asserted on its effect: caption dropout, shuffled tags, offset and
pyramid noise, zero terminal SNR with v-prediction, EMA, the text encoder's own learning rate, every optimizer,
TensorBoard logs, and latents cached on disk across runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import train_config

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from edtools.config import ConfigError, TrainConfig  # noqa: E402
from edtools.models import load_components  # noqa: E402
from edtools.train import train  # noqa: E402
from edtools.train.noise import noise_scheduler_for, training_noise  # noqa: E402


def make_config(root: Path, model: Path, out: Path, **values) -> TrainConfig:
    return train_config(root, model, out, **{**dict(epochs=1), **values})


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def captioned(tree, captions: list[str]) -> Path:
    root = tree({"a": len(captions)})
    for path, caption in zip(sorted((root / "a").glob("*.png")), captions, strict=True):
        path.with_suffix(".txt").write_text(caption)
    return root


# --- noise ------------------------------------------------------------------------------------------------


def test_noise_options_are_plain_noise_when_off_and_shift_or_colour_it_when_on():
    shape = (64, 4, 16, 16)
    plain = training_noise(shape, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    offset = training_noise(shape, torch.Generator().manual_seed(0), offset=0.5)
    channel_means = offset.mean(dim=(2, 3))
    assert channel_means.std() > 5 * plain.mean(dim=(2, 3)).std()  # each image and channel shifted
    pyramid = training_noise(shape, torch.Generator().manual_seed(0), pyramid_discount=0.8)
    assert torch.allclose(pyramid.std(dim=(1, 2, 3)), torch.ones(64), atol=1e-5)  # rescaled to unit variance
    low = lambda x: torch.nn.functional.avg_pool2d(x, 8).var()  # noqa: E731 - energy at low frequencies
    assert low(pyramid) > 3 * low(plain)


def test_zero_terminal_snr_rescales_the_schedule_and_needs_v_prediction(tree, tiny_model, tmp_path):
    scheduler = load_components(str(tiny_model)).noise_scheduler
    rescaled = noise_scheduler_for(scheduler, prediction_type="v_prediction", zero_terminal_snr=True)
    assert float(rescaled.alphas_cumprod[-1]) < 1e-6 < float(scheduler.alphas_cumprod[-1])
    assert rescaled.config.prediction_type == "v_prediction" and rescaled.config.rescale_betas_zero_snr
    root = tree({"a": 2})
    with pytest.raises(ConfigError, match="predicts epsilon.*prediction_type v_prediction"):
        train(make_config(root, tiny_model, tmp_path / "refused", zero_terminal_snr=True))
    result = train(
        make_config(
            root, tiny_model, tmp_path / "ztsnr", zero_terminal_snr=True, prediction_type="v_prediction"
        )
    )
    saved = load_components(
        result.checkpoint
    ).noise_scheduler.config  # the checkpoint says what it was trained for
    assert saved.prediction_type == "v_prediction" and saved.rescale_betas_zero_snr
    assert saved.timestep_spacing == "trailing"


@pytest.mark.slow
def test_offset_noise_changes_training(tree, tiny_model, tmp_path):
    root = tree({"a": 2})
    plain = train(make_config(root, tiny_model, tmp_path / "plain"))
    offset = train(make_config(root, tiny_model, tmp_path / "offset", offset_noise=0.1))
    again = train(make_config(root, tiny_model, tmp_path / "again", offset_noise=0.1))
    unet = lambda r: state(load_components(r.checkpoint).unet)  # noqa: E731
    assert not same(unet(plain), unet(offset)) and same(unet(offset), unet(again))


# --- captions -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_caption_dropout_one_makes_captions_irrelevant(tree, tiny_model, tmp_path):
    first = captioned(tree, ["a red dog", "a blue cat", "a photo of a dog"])
    second = captioned(tree, ["a painting of a man", "green", "a woman in the style of a drawing"])
    runs = [
        train(make_config(root, tiny_model, tmp_path / f"run{i}", caption_dropout=1.0))
        for i, root in enumerate((first, second))
    ]
    for name in ("unet", "text_encoder"):
        a, b = (state(getattr(load_components(r.checkpoint), name)) for r in runs)
        assert same(a, b), name
    with_captions = train(make_config(second, tiny_model, tmp_path / "kept"))
    assert not same(
        state(load_components(with_captions.checkpoint).unet), state(load_components(runs[1].checkpoint).unet)
    )


@pytest.mark.slow
def test_shuffled_tags_change_what_trains(tree, tiny_model, tmp_path):
    root = captioned(tree, ["a dog, red, blue, green", "a cat, photo, painting, drawing"])
    plain = train(make_config(root, tiny_model, tmp_path / "plain", epochs=2))
    shuffled = train(
        make_config(root, tiny_model, tmp_path / "shuffled", epochs=2, shuffle_tags=True, keep_tags=1)
    )
    assert not same(
        state(load_components(plain.checkpoint).unet), state(load_components(shuffled.checkpoint).unet)
    )


# --- what trains, and how -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_text_encoder_lr_zero_keeps_the_text_encoder(tree, tiny_model, tmp_path):
    root = tree({"a": 2})
    result = train(make_config(root, tiny_model, tmp_path / "out", text_encoder_lr=0.0, optimizer="adamw"))
    base, trained = load_components(str(tiny_model)), load_components(result.checkpoint)
    assert same(state(base.text_encoder), state(trained.text_encoder))
    assert not same(state(base.unet), state(trained.unet))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["paged_adamw8bit", "lion8bit", "adamw", "prodigy"])
def test_every_optimizer_trains(tree, tiny_model, tmp_path, optimizer):
    root = tree({"a": 4})
    lr = 1.0 if optimizer == "prodigy" else 1e-4
    events = []
    result = train(
        make_config(root, tiny_model, tmp_path / optimizer, optimizer=optimizer, lr=lr), events.append
    )
    steps = [e for e in events if e.kind == "step"]
    assert (
        result.global_step == 2 and all(e.loss == e.loss for e in steps) and not any(e.skipped for e in steps)
    )
    assert not same(
        state(load_components(str(tiny_model)).unet), state(load_components(result.checkpoint).unet)
    )


@pytest.mark.slow
def test_ema_is_saved_used_and_resumed_exactly(tree, tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    root = tree({"a": 6})
    config = make_config(root, tiny_model, tmp_path / "whole", epochs=2, ema_decay=0.9, ema_on_cpu=True)
    whole = train(config)
    ema_folder = Path(whole.checkpoint) / "unet_ema"
    averaged = state(UNet2DConditionModel.from_pretrained(ema_folder))
    trained = state(load_components(whole.checkpoint).unet)
    base = state(load_components(str(tiny_model)).unet)
    assert not same(averaged, trained) and not same(averaged, base)
    key = "conv_in.weight"  # the average lies between where training started and where it is
    assert (averaged[key] - trained[key]).abs().sum() < (base[key] - trained[key]).abs().sum()
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    train(dataclasses.replace(parts, max_steps=4))
    last = train(dataclasses.replace(parts, resume=True))
    assert same(state(UNet2DConditionModel.from_pretrained(Path(last.checkpoint) / "unet_ema")), averaged)
    with pytest.raises(ConfigError, match="ema_decay: checkpoint 0.9, now None"):
        train(dataclasses.replace(parts, resume=True, ema_decay=None, epochs=3))


# --- logs and caches ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tensorboard_logs_losses_learning_rate_speed_and_validation(tree, tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tree({"a": 4, "b": 3})
    result = train(
        make_config(root, tiny_model, tmp_path / "out", log_with="tensorboard", validation_split=0.3)
    )
    logs = EventAccumulator(str(Path(result.out) / "logs"))
    logs.Reload()
    tags = set(logs.Tags()["scalars"])
    assert {"loss", "lr", "images_per_second", "loss_per_concept/a", "validation/a", "validation/b"} <= tags
    assert [e.step for e in logs.Scalars("loss")] == list(range(1, result.global_step + 1))
    assert [e.step for e in logs.Scalars("validation/a")] == [0, result.global_step]


@pytest.mark.slow
def test_disk_cache_serves_a_second_run_without_decoding_or_encoding(tree, tiny_model, tmp_path, monkeypatch):
    import edtools.data.batches as data_module  # where ScheduleBatches looks decode_image up

    root = tree({"a": 3, "b": 2}, sizes=((64, 64), (96, 64)))
    config = make_config(
        root, tiny_model, tmp_path / "first", cache_latents="disk", center_crop=False, flip_p=0.5
    )
    first = train(config)
    assert list((root / ".edtools_cache" / "latents").rglob("*.safetensors"))
    decoded = []
    real_decode = data_module.decode_image
    monkeypatch.setattr(data_module, "decode_image", lambda *a: decoded.append(a) or real_decode(*a))
    second = train(dataclasses.replace(config, out=str(tmp_path / "second")))
    assert decoded == []  # every crop and flip of the second run was on disk already
    assert same(state(load_components(first.checkpoint).unet), state(load_components(second.checkpoint).unet))
    elsewhere = tmp_path / "cache"
    train(dataclasses.replace(config, out=str(tmp_path / "third"), cache_dir=str(elsewhere)))
    assert list(elsewhere.rglob("*.safetensors"))


@pytest.mark.slow
def test_kohya_folder_names_repeat_only_when_asked(tree, tiny_model, tmp_path):
    root = tree({"3_alice": 2, "bob": 2})
    counts = {}
    for on in (False, True):
        events = []
        train(make_config(root, tiny_model, tmp_path / f"kohya-{on}", kohya_repeats=on), events.append)
        (epoch,) = [e for e in events if e.kind == "epoch"]
        counts[on] = epoch.images_per_concept
    assert counts == {False: {"3_alice": 2, "bob": 2}, True: {"3_alice": 6, "bob": 2}}
