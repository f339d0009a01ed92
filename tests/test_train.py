"""train_step and train() on the tiny SD model at resolution 64 (latents 8x8) with small data roots built in code.

The resume test compares weights bit for bit: a run stopped and resumed must equal the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_config

from edtools.balance.schedule import build_epoch
from edtools.config import ConfigError, TrainConfig
from edtools.data import ScheduleBatches
from edtools.dataset.scan import load_dataset
from edtools.models import load_components, make_tiny_model
from edtools.train import (
    TrainState,
    find_checkpoints,
    load_checkpoint,
    make_grad_scaler,
    make_lr_scheduler,
    make_optimizer,
    prepare_modules,
    save_checkpoint,
    step_generator,
    train,
    train_step,
)
from edtools.train.setup import make_latent_cache

make_config = train_config


def weights(components) -> dict[str, torch.Tensor]:
    return {
        **{f"unet.{k}": v.detach().clone() for k, v in components.unet.state_dict().items()},
        **{f"text_encoder.{k}": v.detach().clone() for k, v in components.text_encoder.state_dict().items()},
    }


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Setup:
    """Components, optimizer, LR schedule and scaler for calling train_step directly."""

    def __init__(self, model: Path, config: TrainConfig, optimizer=None):
        self.config = config
        self.components = load_components(str(model))
        self.params = prepare_modules(self.components, config, "cpu")
        self.optimizer = optimizer(self.params) if optimizer else make_optimizer(config, self.params)
        self.lr_scheduler = make_lr_scheduler(config, self.optimizer, 100)
        self.scaler = make_grad_scaler(config, "cpu")
        self.cache = make_latent_cache(config, self.components)

    def batch(self, b: int = 0, epoch: int = 0) -> dict:
        dataset = load_dataset(self.config.data_root)
        schedule = build_epoch(
            dataset, epoch=epoch, seed=self.config.seed, batch_size=self.config.batch_size, resolution=64
        )
        return ScheduleBatches(
            dataset,
            schedule,
            self.components.tokenizer,
            seed=self.config.seed,
            latent_keys=self.cache.enabled,
        )[b]

    def step(self, batch: dict, *, generator=None, **kwargs):
        return train_step(
            self.components,
            self.optimizer,
            batch,
            config=self.config,
            lr_scheduler=self.lr_scheduler,
            scaler=self.scaler,
            latent_cache=self.cache,
            generator=generator if generator is not None else step_generator(0, 0, 0, 0),
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------------------
# train_step


def test_loss_decreases_when_overfitting_a_fixed_batch(tree, tiny_model, tmp_path):
    root = tree({"a": 2})
    setup = Setup(tiny_model, make_config(root, tiny_model, tmp_path / "out", lr=2e-3))
    batch = setup.batch()
    losses = [setup.step(batch, generator=step_generator(1, 0, 0, 0)).loss for _ in range(30)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * losses[0]


def test_adamw8bit_state_is_uint8(tree, tiny_model, tmp_path):
    setup = Setup(tiny_model, make_config(tree({"a": 2}), tiny_model, tmp_path / "out"))
    result = setup.step(setup.batch())
    assert result.stepped and not result.skipped
    big = [p for p in setup.params if p.numel() >= 4096]
    assert big, "the tiny model should have tensors large enough for 8-bit state"
    for p in big:
        state = setup.optimizer.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
        assert state["state1"].shape == p.shape
    tensors = {v.data_ptr(): v for p in big for v in setup.optimizer.state[p].values() if torch.is_tensor(v)}
    state_bytes = sum(v.numel() * v.element_size() for v in tensors.values())  # quantile maps are shared
    assert state_bytes / sum(p.numel() for p in big) < 2.2  # two 1-byte moments + block scales


def test_nan_loss_skips_the_step_and_leaves_weights_and_optimizer_state(tree, tiny_model, tmp_path):
    setup = Setup(tiny_model, make_config(tree({"a": 4}), tiny_model, tmp_path / "out", grad_accum=2))
    good = setup.batch(0)
    setup.step(good, sync=False)
    assert setup.step(setup.batch(1)).stepped  # one real step, so the optimizer has state to compare
    before = weights(setup.components)
    state_before = {
        id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
        for p, s in setup.optimizer.state.items()
    }
    lr_steps = setup.lr_scheduler.last_epoch

    poisoned = dict(good, pixel_values=good["pixel_values"].clone())
    poisoned["pixel_values"][0] = float("nan")
    first = setup.step(poisoned, sync=False)  # NaN in the group's first batch ...
    assert first.nonfinite and not first.stepped
    second = setup.step(good, sync=True, nonfinite_before=first.nonfinite)  # ... skips the group's step
    assert second.skipped and not second.stepped and not second.nonfinite
    assert_same_weights(before, weights(setup.components))
    for p, s in setup.optimizer.state.items():
        for k, v in state_before[id(p)].items():
            assert torch.equal(s[k], v), k
    assert all(p.grad is None for p in setup.params)  # the poisoned gradients were dropped
    assert setup.lr_scheduler.last_epoch == lr_steps + 1
    assert setup.step(good).stepped  # and training goes on


def test_gradient_accumulation_matches_one_big_batch(tree, tiny_model, tmp_path, monkeypatch):
    """grad_accum 2 of batch 2 gives the gradient of batch 4 on the same images, noise and timesteps."""
    root = tree({"a": 2, "b": 2})
    (root / "b" / "loss_scale.txt").write_text("2")
    sgd = lambda params: torch.optim.SGD(params, lr=1.0)  # noqa: E731 - the update is exactly -gradient
    common = dict(max_grad_norm=None, cache_latents="memory")
    big = Setup(tiny_model, make_config(root, tiny_model, tmp_path / "o1", batch_size=4, **common), sgd)
    small = Setup(tiny_model, make_config(root, tiny_model, tmp_path / "o2", grad_accum=2, **common), sgd)
    batch = big.batch()
    assert len(batch["image_index"]) == 4 and sorted(batch["loss_scale"].tolist()) == [1, 1, 2, 2]
    halves = [
        {k: (v[s] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
        for s in (slice(0, 2), slice(2, 4))
    ]
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([10, 300, 600, 950])

    def serve(parts):
        queue = list(parts)
        return lambda *args, **kwargs: queue.pop(0).clone()

    start = weights(big.components)
    monkeypatch.setattr(torch, "randn", serve([noise]))
    monkeypatch.setattr(torch, "randint", serve([timesteps]))
    big.step(batch)
    monkeypatch.setattr(torch, "randn", serve([noise[:2], noise[2:]]))
    monkeypatch.setattr(torch, "randint", serve([timesteps[:2], timesteps[2:]]))
    assert not small.step(halves[0], sync=False).stepped
    assert small.step(halves[1], sync=True).stepped
    monkeypatch.undo()

    after_big, after_small = weights(big.components), weights(small.components)
    moved = 0
    for key in start:
        delta_big, delta_small = after_big[key] - start[key], after_small[key] - start[key]
        # a delta read off weights near 1 carries their float32 rounding: one ulp there is 1.2e-7
        torch.testing.assert_close(delta_small, delta_big, rtol=1e-4, atol=3e-7)
        moved += int(delta_big.abs().max() > 0)
    assert moved > len(start) // 2


def test_loss_scale_zero_trains_nothing(tree, tiny_model, tmp_path):
    root = tree({"a": 2})
    (root / "a" / "loss_scale.txt").write_text("0")
    sgd = lambda params: torch.optim.SGD(params, lr=1.0)  # noqa: E731
    setup = Setup(tiny_model, make_config(root, tiny_model, tmp_path / "out"), sgd)
    before = weights(setup.components)
    result = setup.step(setup.batch())
    assert result.loss == 0 and result.per_sample.gt(0).all()  # the images have an error, it just weighs 0
    assert_same_weights(before, weights(setup.components))


@pytest.mark.parametrize(
    "options",
    [
        dict(
            mixed_precision="bf16", gradient_checkpointing=True, train_text_encoder=False, min_snr_gamma=5.0
        ),
        dict(
            mixed_precision="fp16",
            gradient_checkpointing=True,
            optimizer="adamw",
            lr_scheduler="linear",
            lr_warmup_steps=2,
        ),
    ],
    ids=["bf16-checkpointing-frozen-te-minsnr-vpred", "fp16-scaler-checkpointing-adamw-warmup-vpred"],
)
def test_step_options(tree, tmp_path, options):
    model = make_tiny_model(tmp_path / "vpred", prediction_type="v_prediction")
    setup = Setup(model, make_config(tree({"a": 2}), model, tmp_path / "out", **options))
    before = weights(setup.components)
    results = [setup.step(setup.batch(), generator=step_generator(0, 0, 0, i)) for i in range(3)]
    assert all(np.isfinite(r.loss) for r in results)
    assert any(r.stepped for r in results)
    after = weights(setup.components)
    unet_moved = any(not torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))
    text_moved = any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_encoder."))
    assert unet_moved
    assert text_moved == setup.config.train_text_encoder
    if setup.config.mixed_precision == "fp16":
        assert setup.scaler.is_enabled() and setup.scaler.get_scale() > 0
    if setup.config.lr_warmup_steps:
        assert results[0].lr == 0.0 and results[1].lr == pytest.approx(setup.config.lr / 2)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_reload_gives_identical_weights_and_optimizer_state(tree, tiny_model, tmp_path):
    config = make_config(tree({"a": 2}), tiny_model, tmp_path / "out")
    setup = Setup(tiny_model, config)
    setup.step(setup.batch())
    state = TrainState(global_step=1, epoch=0, batch=1)
    path = save_checkpoint(
        tmp_path / "ckpts",
        setup.components,
        optimizer=setup.optimizer,
        lr_scheduler=setup.lr_scheduler,
        scaler=setup.scaler,
        state=state,
        config=config,
    )
    assert path.name == "step-00000001" and (path / "model_index.json").is_file()

    reloaded = Setup(path, config)  # the checkpoint folder is a diffusers model
    assert_same_weights(weights(setup.components), weights(reloaded.components))
    loaded_state, info = load_checkpoint(
        path, optimizer=reloaded.optimizer, lr_scheduler=reloaded.lr_scheduler, scaler=reloaded.scaler
    )
    assert loaded_state == state and info["config"] == config.to_dict()
    assert reloaded.lr_scheduler.last_epoch == setup.lr_scheduler.last_epoch
    for p, q in zip(setup.params, reloaded.params, strict=True):
        saved, restored = setup.optimizer.state[p], reloaded.optimizer.state[q]
        assert saved.keys() == restored.keys()
        for key in saved:
            if torch.is_tensor(saved[key]):
                assert torch.equal(saved[key], restored[key]), key
            else:
                assert saved[key] == restored[key]


def test_torn_saves_are_never_resumed(tmp_path):
    folder = tmp_path / "out" / "checkpoints"
    (folder / ".step-00000009.abc.tmp" / "resume").mkdir(parents=True)  # a save cut off mid-way
    (folder / "step-00000008").mkdir()  # no model, no state
    complete = folder / "step-00000003"
    (complete / "resume").mkdir(parents=True)
    for name in ("model_index.json", "resume/state.json", "resume/state.pt"):
        (complete / name).write_text("{}")
    assert find_checkpoints(tmp_path / "out") == [complete]
    assert find_checkpoints(tmp_path / "nothing") == []


# ---------------------------------------------------------------------------------------------------------
# The loop


@pytest.mark.slow
def test_stop_and_resume_equals_the_uninterrupted_run(tree, tiny_model, tmp_path):
    """Stops mid-epoch (max_steps), at an epoch's end (max_steps) and on the callback, then resumes each time.
    Random crops, flips, a fractional multiplier, accumulation and a warmup+cosine LR are all in play."""
    root = tree({"a": 4, "b": 3}, sizes=((64, 64), (128, 64)))
    (root / "b" / "multiply.txt").write_text("1.5")
    config = make_config(
        root,
        tiny_model,
        tmp_path / "whole",
        epochs=3,
        grad_accum=2,
        center_crop=False,
        flip_p=0.5,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        checkpoint_every_epochs=0,
    )
    whole = train(config)
    dataset = load_dataset(root)
    steps = [
        -(-build_epoch(dataset, epoch=e, seed=config.seed, batch_size=2, resolution=64).n_batches // 2)
        for e in range(3)
    ]
    assert whole.stop_reason == "finished" and whole.global_step == sum(steps) and steps[0] >= 2

    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    first = train(dataclasses.replace(parts, max_steps=1))  # mid-epoch 0
    assert (first.stop_reason, first.global_step, first.epoch, first.batch) == ("max_steps", 1, 0, 2)
    second = train(dataclasses.replace(parts, resume=True, max_steps=steps[0] + steps[1]))  # at epoch 1's end
    assert (second.global_step, second.epoch, second.batch) == (steps[0] + steps[1], 2, 0)

    seen = []

    def stop_after_one_step(event):
        seen.append(event.kind)
        return event.kind == "step"

    third = train(dataclasses.replace(parts, resume=True), stop_after_one_step)
    assert (third.stop_reason, third.global_step) == ("callback", second.global_step + 1)
    assert seen.count("step") == 1 and seen[-1] == "end" and "checkpoint" in seen
    assert Path(third.checkpoint).name == f"step-{third.global_step:08d}"
    last = train(dataclasses.replace(parts, resume=True))
    assert last.stop_reason == "finished" and last.global_step == whole.global_step

    assert_same_weights(weights(load_components(whole.checkpoint)), weights(load_components(last.checkpoint)))
    assert not torch.equal(
        load_components(str(tiny_model)).unet.conv_in.weight,
        load_components(whole.checkpoint).unet.conv_in.weight,
    )


def test_callback_stop_leaves_a_resumable_checkpoint(tree, tiny_model, tmp_path):
    config = make_config(tree({"a": 6}), tiny_model, tmp_path / "out", epochs=1)
    events = []
    result = train(config, lambda e: events.append(e) or e.kind == "step")
    assert result.stop_reason == "callback" and result.global_step == 1 and result.batch == 1
    assert [e.kind for e in events] == ["step", "checkpoint", "end"]
    assert events[-1].result == result
    state = json.loads((Path(result.checkpoint) / "resume" / "state.json").read_text())
    assert (state["global_step"], state["epoch"], state["batch"]) == (1, 0, 1)
    assert find_checkpoints(config.out) == [Path(result.checkpoint)]
    resumed = train(dataclasses.replace(config, resume=True))
    assert resumed.stop_reason == "finished" and resumed.global_step == 3


def test_events_samples_schedules_and_kept_checkpoints(tree, tiny_model, tmp_path):
    root = tree({"people/alice": 3, "style": 2})
    (root / "style" / "multiply.txt").write_text("2")
    config = make_config(
        root,
        tiny_model,
        tmp_path / "out",
        sample_prompts=("a photo of alice", "a painting"),
        sample_every_steps=2,
        sample_steps=2,
        write_schedule=True,
        keep_checkpoints=1,
    )
    events = []
    result = train(config, events.append)
    out = Path(config.out)
    dataset = load_dataset(root)
    steps = [e for e in events if e.kind == "step"]
    assert [e.global_step for e in steps] == list(range(1, result.global_step + 1))
    assert all(e.lr == config.lr and np.isfinite(e.loss) and e.images for e in steps)
    for epoch in range(config.epochs):
        schedule = build_epoch(dataset, epoch=epoch, seed=config.seed, batch_size=2, resolution=64)
        trained = [i for e in steps if e.epoch == epoch for i in e.images]
        assert sorted(trained) == sorted(schedule.image_index.tolist())  # each scheduled image once
        (epoch_event,) = [e for e in events if e.kind == "epoch" and e.epoch == epoch]
        assert epoch_event.images_per_concept == {"people/alice": 3, "style": 4}
        assert epoch_event.expected == {"people/alice": 3.0, "style": 4.0}
        assert (out / "schedules" / f"ep{epoch}_batch_schedule.txt").is_file()
    alice = [e.loss_per_concept["people/alice"] for e in steps if "people/alice" in e.loss_per_concept]
    assert alice and all(np.isfinite(alice))

    samples = [e for e in events if e.kind == "sample"]
    expected_steps = sorted({*range(2, result.global_step + 1, 2), result.global_step})
    assert [e.global_step for e in samples] == expected_steps
    from PIL import Image

    with Image.open(samples[-1].paths[0]) as grid:
        assert grid.width == 2 * 64 and grid.height > 64
    assert [p.name for p in find_checkpoints(out)] == [f"step-{result.global_step:08d}"]  # keep_checkpoints 1
    assert (out / "balance_actual.png").is_file()

    # Sampling restores modes and random state: the same run without samples ends with the same weights.
    plain = train(
        dataclasses.replace(config, out=str(tmp_path / "plain"), sample_prompts=(), write_schedule=False)
    )
    assert_same_weights(
        weights(load_components(result.checkpoint)), weights(load_components(plain.checkpoint))
    )


def test_nan_batch_in_the_loop_is_skipped_and_reported(tree, tiny_model, tmp_path, monkeypatch, caplog):
    original = ScheduleBatches.__getitem__

    def poisoned(self, b):
        batch = original(self, b)
        if self.schedule.epoch == 0 and b == 1:
            batch["pixel_values"][:] = float("inf")
        return batch

    monkeypatch.setattr(ScheduleBatches, "__getitem__", poisoned)
    events = []
    config = make_config(tree({"a": 6}), tiny_model, tmp_path / "out", epochs=1)
    result = train(config, events.append)
    assert result.skipped_steps == 1 and result.global_step == 3
    assert [e.skipped for e in events if e.kind == "step"] == [False, True, False]
    assert "this optimizer step is skipped" in caplog.text


def test_out_folder_rules(tree, tiny_model, tmp_path):
    config = make_config(tree({"a": 2}), tiny_model, tmp_path / "out", epochs=1)
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        train(dataclasses.replace(config, resume=True))
    train(config)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(config)
    with pytest.raises(ConfigError, match=r"batch_size: checkpoint 2, now 1"):
        train(dataclasses.replace(config, resume=True, batch_size=1))
    again = train(dataclasses.replace(config, overwrite=True))
    assert again.global_step == 1 and len(find_checkpoints(config.out)) == 1
    with pytest.raises(ConfigError, match="unknown concept"):
        train(dataclasses.replace(config, overwrite=True, multipliers={"nope": 2}))


def test_timed_checkpoints(tree, tiny_model, tmp_path):
    config = make_config(
        tree({"a": 6}),
        tiny_model,
        tmp_path / "out",
        epochs=1,
        checkpoint_every_epochs=0,
        checkpoint_every_minutes=1e-9,
    )
    events = []
    result = train(config, events.append)
    assert [e.global_step for e in events if e.kind == "checkpoint"] == [1, 2, 3]
    assert [p.name for p in find_checkpoints(config.out)] == [f"step-{s:08d}" for s in (1, 2, 3)]
    assert result.checkpoint == str(find_checkpoints(config.out)[-1])


def test_missing_bitsandbytes_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    config = make_config(tmp_path, tmp_path, tmp_path / "out")
    with pytest.raises(ImportError, match=r"pip install -U 'bitsandbytes>=0.50'.*optimizer: adamw"):
        make_optimizer(config, [torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(
        make_optimizer(dataclasses.replace(config, optimizer="adamw"), [torch.nn.Parameter(torch.zeros(3))]),
        torch.optim.AdamW,
    )


def test_an_image_that_fails_to_decode_mid_run_is_skipped_and_listed(
    tree, tiny_model, tmp_path, monkeypatch, caplog
):
    import edtools.data.batches as data_module  # where ScheduleBatches looks decode_image up

    root = tree({"a": 4, "b": 2})
    real = data_module.decode_image
    broken = {"a/a_001.png", "b/b_000.png", "b/b_001.png"}  # b's whole batch fails in epoch 0 at batch size 2

    def failing(path, crop):
        if Path(path).relative_to(root).as_posix() in broken:
            raise ValueError(
                f"cannot load image {path}: image file is truncated; fix or remove the file and re-scan"
            )
        return real(path, crop)

    monkeypatch.setattr(data_module, "decode_image", failing)
    events = []
    result = train(make_config(root, tiny_model, tmp_path / "out", epochs=1), events.append)
    assert result.stop_reason == "finished" and result.global_step == 3
    trained = [i for e in events if e.kind == "step" for i in e.images]
    dataset = load_dataset(root)
    assert sorted(dataset.paths[i] for i in trained) == ["a/a_000.png", "a/a_002.png", "a/a_003.png"]
    lines = (Path(result.out) / "skipped_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in lines) == sorted(broken)
    assert all(line.startswith("epoch 0\t") and "truncated" in line for line in lines)
    assert caplog.text.count("skipped") >= 3
