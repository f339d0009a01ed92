"""The training loop: train(config, callback) trains exactly the batches the scheduler produced, epoch by epoch.

train() reads top to bottom; each part (start, one epoch, end of epoch, checkpoint, samples, finish) is a
function over one _Run that holds the run's state. Random draws depend only on (seed, epoch, rank, batch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, TrainConfig
from ..dataset import Dataset
from ..errors import require
from ..schedule import (
    EpochSchedule,
    build_epoch,
    expected_images_per_epoch,
    make_buckets,
    shard,
    write_schedule,
)
from .checkpoint import (
    CHECKPOINTS_DIR,
    TrainState,
    check_resume,
    checkpoint_info,
    find_checkpoints,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
    schedule_fingerprint,
)
from .ema import ema_step, ema_weights, make_ema
from .events import TrainEvent, TrainResult
from .rebalance import BalanceSource, epoch_values, saved_values, with_saved_values
from .records import (
    append_balance_history,
    append_training_loss,
    append_validation,
    plot_records,
    prepare_out,
    trim_records,
    write_validation_images,
)
from .runtime import Runtime, make_runtime
from .sample import SAMPLES_DIR, save_samples
from .setup import (
    configure_noise,
    fill_text_cache,
    load_data,
    make_latent_cache,
    planned_steps,
    resolve_config,
    wrap_trained,
)
from .step import (
    make_grad_scaler,
    make_lr_scheduler,
    make_optimizer,
    prepare_modules,
    quiet_bitsandbytes,
    step_generator,
    train_step,
)
from .tensorboard import LOGS_DIR, TensorBoardLog

__all__ = ["SCHEDULES_DIR", "TrainEvent", "TrainResult", "train"]

log = logging.getLogger("edtools.train")

SCHEDULES_DIR = "schedules"


# ---------------------------------------------------------------------------------------------------------
# The loop


def train(
    config: TrainConfig,
    callback: Callable[[TrainEvent], bool | None] | None = None,
    *,
    balance: BalanceSource | None = None,
) -> TrainResult:
    """Train config.model on config.data_root; write checkpoints, samples, schedules and records under
    config.out.

    callback gets every TrainEvent; returning True stops cleanly after the current step with a resumable
    checkpoint. With config.live_balance each epoch's multipliers and loss scales are read at its start: from
    `balance` (epoch -> (multipliers, loss_scales), the notebook's sliders) or else from the data root's files.
    Under `accelerate launch` each process trains its shard of every epoch's batches.
    """
    run = _start(config, callback, balance)
    if run.state.global_step == 0 and run.state.batch == 0:
        _validate(run)  # before training: where each concept starts
    stop_reason = "max_steps" if _at_max_steps(run) else "finished"
    while stop_reason == "finished" and run.state.epoch < config.epochs:
        if run.state.batch == 0 and config.live_balance:
            _rebalance(run)
        stop_reason = _train_epoch(run, run.state.epoch)
        if stop_reason == "finished":
            stop_reason = _end_epoch(run)
    return _finish(run, stop_reason)


@dataclass
class _Run:
    """One train() call: what it was given, what it built, and where it stands."""

    config: TrainConfig
    callback: Callable[[TrainEvent], bool | None] | None
    balance: BalanceSource | None
    runtime: Runtime
    out: Path
    dataset: Dataset  # the training images, with the multipliers and loss scales of the epoch in progress
    buckets: Any
    validator: Any  # a Validator of the held-out images, or None
    components: Any  # SDComponents: the modules checkpoints and samples use
    step_components: Any  # the same, with DDP-wrapped trainable modules under several processes
    optimizer: Any
    lr_scheduler: Any
    scaler: Any
    latent_cache: Any
    params: list  # the trained parameters (those the optimizer steps)
    ema: Any  # diffusers' EMAModel of them, or None
    tensorboard: Any  # a TensorBoardLog on the main process, or None
    text_cache: Any  # a filled TextEmbeddingCache (frozen text encoders), or None
    progress: Any
    state: TrainState
    resume_from: Path | None
    resume_fingerprint: str | None
    started: float
    start_step: int
    stop_requested: bool = False
    last_loss: float | None = None
    last_checkpoint: Path | None = None
    last_checkpoint_step: int = -1
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    last_sample_step: int = -1
    last_validation_step: int = -1
    planned_steps: int = 0  # optimizer steps the LR schedule spans
    epoch_loss: dict[str, list[float]] = field(
        default_factory=dict
    )  # concept -> [MSE sum, images] this epoch

    def schedule(self, epoch: int) -> EpochSchedule:
        c = self.config
        return build_epoch(
            self.dataset, epoch=epoch, seed=c.seed, batch_size=c.batch_size, buckets=self.buckets
        )

    def say(self, message: str, *args: Any) -> None:
        """Log on the main process only: one process tells the story."""
        log.log(logging.INFO if self.runtime.main else logging.DEBUG, message, *args)


def _start(
    config: TrainConfig, callback: Callable[[TrainEvent], bool | None] | None, balance: BalanceSource | None
) -> _Run:
    """Check the out folder and resume settings, load the model, scan the data and hold out the validation
    images, build the optimizer and the LR / fp16 loss-scale schedules, and restore a checkpoint's state."""
    from tqdm.auto import tqdm

    from ..models import load_components
    from .validate import Validator

    started = time.monotonic()
    quiet_bitsandbytes()
    runtime = make_runtime(config)
    out = Path(config.out).expanduser()
    resume_from = prepare_out(config, out, runtime)
    info = checkpoint_info(resume_from) if resume_from is not None else {}
    # A full fine-tune resumes from the checkpoint's weights; LoRA from the base model plus its adapters.
    if resume_from is not None and config.lora_rank == 0:
        components = load_components(str(resume_from))
    else:
        components = load_components(config.model, model_config=config.model_config)
    config = resolve_config(config, components, runtime)
    configure_noise(components, config)
    if resume_from is not None:
        check_resume(info, config, runtime.world_size, resume_from)
    dataset, validation = load_data(config, runtime.main)
    if info.get("epoch_values") and info.get("batch"):  # resumed mid-epoch: that epoch's own values
        dataset = with_saved_values(dataset, info["epoch_values"])
    buckets = make_buckets(config.resolution)

    params = prepare_modules(components, config, runtime.device)
    text_params = [p for e in components.text_encoders for p in e.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, text_params)
    ema = make_ema(config, params)
    state = TrainState(
        **{k: info[k] for k in ("global_step", "epoch", "batch", "skipped_steps") if k in info}
    )
    planned = planned_steps(config, dataset, buckets, state, runtime.world_size)
    lr_scheduler = make_lr_scheduler(config, optimizer, planned)
    scaler = make_grad_scaler(config, runtime.device)
    if resume_from is not None:
        state, _ = load_checkpoint(
            resume_from,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            scaler=scaler,
            components=components,
            ema=ema,
        )
        if runtime.main:
            trim_records(out, global_step=state.global_step, epoch=state.epoch)
    captions = dataset.captions + (validation.captions if validation is not None else ())
    text_cache = (
        fill_text_cache(components, captions, config, runtime) if config.cache_text_embeddings else None
    )
    validator = None
    if validation is not None and len(validation):
        validator = Validator(
            validation, config, buckets, components.noise_scheduler.config.num_train_timesteps
        )
        if runtime.main:
            write_validation_images(out, validation)
    progress = tqdm(
        total=planned,
        initial=state.global_step,
        unit="step",
        disable=not (config.progress_bar and runtime.main),
        dynamic_ncols=True,
    )
    run = _Run(
        config=config,
        callback=callback,
        balance=balance,
        runtime=runtime,
        out=out,
        dataset=dataset,
        buckets=buckets,
        validator=validator,
        components=components,
        step_components=wrap_trained(components, runtime),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scaler=scaler,
        latent_cache=make_latent_cache(config, components),
        params=params,
        ema=ema,
        tensorboard=TensorBoardLog(out / LOGS_DIR)
        if config.log_with == "tensorboard" and runtime.main
        else None,
        text_cache=text_cache,
        progress=progress,
        state=state,
        resume_from=resume_from,
        resume_fingerprint=info.get("schedule_fingerprint"),
        started=started,
        start_step=state.global_step,
        last_checkpoint=resume_from,
        last_checkpoint_step=state.global_step if resume_from is not None else -1,
        planned_steps=planned,
        epoch_loss={c: list(v) for c, v in (info.get("epoch_loss") or {}).items()} if state.batch else {},
    )
    if resume_from is not None:
        run.say("resuming from %s: step %d, epoch %d, batch %d", resume_from, *dataclasses.astuple(state)[:3])
    run.say(
        "training %d images in %d concepts%s: %d optimizer steps over %d epochs on %s (%s, %s, %d process%s)",
        len(dataset),
        len(dataset.concepts),
        f", {len(validator)} held out for validation" if validator is not None else "",
        planned,
        config.epochs,
        runtime.device,
        config.optimizer,
        "fp32" if config.mixed_precision == "no" else config.mixed_precision,
        runtime.world_size,
        "es" if runtime.world_size > 1 else "",
    )
    return run


def _rebalance(run: _Run) -> None:
    """At an epoch's start with live_balance: this epoch's multipliers and loss scales (the files, or the
    notebook's sliders), and the LR schedule and progress bar stretched or shrunk to the steps that now remain."""
    run.dataset = epoch_values(run.dataset, run.config, run.state.epoch, run.balance)
    planned = planned_steps(run.config, run.dataset, run.buckets, run.state, run.runtime.world_size)
    if planned != run.planned_steps:
        state = run.lr_scheduler.state_dict()
        run.lr_scheduler = make_lr_scheduler(run.config, run.optimizer, planned)
        run.lr_scheduler.load_state_dict(state)  # same position, new length
        run.planned_steps = planned
        run.progress.total = planned
        run.progress.refresh()


def _train_epoch(run: _Run, epoch: int) -> str:
    """Train this rank's batches of one epoch from where the state stands. Returns "finished" at the
    epoch's end, else why it stopped early (callback or max_steps; a checkpoint is then saved)."""
    torch = require("torch")
    from ..data import ScheduleBatches, make_loader

    config, runtime, concepts = run.config, run.runtime, run.dataset.concept_paths
    full = run.schedule(epoch)
    fingerprint = schedule_fingerprint(full)
    if config.write_schedule and runtime.main:
        write_schedule(full, run.dataset, run.out / SCHEDULES_DIR)
    local = shard(full, runtime.rank, runtime.world_size) if runtime.world_size > 1 else full
    start = run.state.batch
    if start and run.resume_fingerprint not in (None, fingerprint):
        raise ConfigError(
            f"cannot resume mid-epoch from {run.resume_from}: epoch {epoch}'s schedule differs from the one "
            "trained (the data root, multipliers or loss_scales changed). Restore them, or resume from a "
            "checkpoint saved at an epoch's end"
        )
    batches = ScheduleBatches(
        run.dataset,
        local,
        run.components.tokenizers,
        center_crop=config.center_crop,
        flip_p=config.flip_p,
        seed=config.seed,
        caption_dropout=config.caption_dropout,
        shuffle_tags=config.shuffle_tags,
        keep_tags=config.keep_tags,
        latent_keys=run.latent_cache.enabled,
        # the loader skips decoding what is cached: a disk store reads in worker processes, memory only in ours
        latent_store=run.latent_cache.store
        if config.cache_latents == "disk" or (config.cache_latents == "memory" and config.num_workers == 0)
        else None,
    )
    loader = make_loader(
        batches,
        num_workers=config.num_workers,
        start_batch=start,
        pin_memory=torch.device(runtime.device).type == "cuda",
    )
    # Per accumulation group: MSE sums and image counts per concept, the images, a non-finite flag.
    sums, counts, images, nonfinite = np.zeros(len(concepts)), np.zeros(len(concepts)), [], False
    for batch in loader:
        b = int(batch["batch"])
        sync = (b + 1) % config.grad_accum == 0 or b + 1 == local.n_batches
        result = train_step(
            run.step_components,
            run.optimizer,
            batch,
            config=config,
            lr_scheduler=run.lr_scheduler,
            scaler=run.scaler,
            latent_cache=run.latent_cache,
            generator=step_generator(config.seed, epoch, runtime.rank, b),
            sync=sync,
            nonfinite_before=nonfinite,
            text_cache=run.text_cache,
        )
        nonfinite = nonfinite or result.nonfinite
        if result.stepped:
            ema_step(run.ema, run.params, config, runtime.device)
        if batch["batch_weight"] > 0:  # a filler batch (shard padding) trains nothing: not counted
            concept = batch["concept"].numpy()
            np.add.at(sums, concept, result.per_sample.numpy().astype(np.float64))
            np.add.at(counts, concept, 1)
            images += batch["image_index"].tolist()
        if not sync:
            continue
        state = run.state
        run.state = TrainState(state.global_step + 1, epoch, b + 1, state.skipped_steps + int(result.skipped))
        totals = runtime.sum([*sums, *counts])
        sums_all, counts_all = np.array(totals[: len(concepts)]), np.array(totals[len(concepts) :])
        loss = float(sums_all.sum() / counts_all.sum()) if counts_all.sum() else float("nan")
        run.last_loss = loss
        for i in np.flatnonzero(counts_all):
            total = run.epoch_loss.setdefault(concepts[i], [0.0, 0])
            total[0], total[1] = total[0] + float(sums_all[i]), total[1] + int(counts_all[i])
        run.progress.update(1)
        run.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
        _emit(
            run,
            TrainEvent(
                "step",
                run.state.global_step,
                epoch,
                batch=b,
                loss=loss,
                loss_per_concept={
                    concepts[i]: float(sums_all[i] / counts_all[i]) for i in np.flatnonzero(counts_all)
                },
                lr=result.lr,
                skipped=result.skipped,
                images=tuple(images),
                total_steps=run.planned_steps,
            ),
        )
        sums, counts, images, nonfinite = np.zeros(len(concepts)), np.zeros(len(concepts)), [], False
        if b + 1 < local.n_batches:  # after an epoch's last step, _end_epoch decides
            stop_reason = _after_step(run, fingerprint)
            if stop_reason is not None:
                return stop_reason
    return "finished"


def _end_epoch(run: _Run) -> str:
    """Count the epoch as done, record and report its images and loss per concept, validate and save the
    epoch's checkpoint when due."""
    epoch = run.state.epoch
    run.state = TrainState(run.state.global_step, epoch + 1, 0, run.state.skipped_steps)
    dataset, concepts = run.dataset, run.dataset.concept_paths
    trained = run.schedule(epoch).images_per_concept(dataset)
    expected = expected_images_per_epoch(dataset)
    if run.runtime.main:
        append_balance_history(run.out, epoch, dataset, trained)
        append_training_loss(run.out, epoch, {c: (s, int(n)) for c, (s, n) in run.epoch_loss.items()})
    run.epoch_loss = {}
    _emit(
        run,
        TrainEvent(
            "epoch",
            run.state.global_step,
            epoch,
            images_per_concept={c: int(n) for c, n in zip(concepts, trained, strict=True)},
            expected={c: float(e) for c, e in zip(concepts, expected, strict=True)},
            multipliers={c.path: c.multiplier for c in dataset.concepts},
            loss_scales={c.path: c.loss_scale for c in dataset.concepts},
        ),
    )
    every = run.config.validate_every_epochs
    if every and run.state.epoch % every == 0:
        _validate(run)
    every = run.config.checkpoint_every_epochs
    if every and run.state.epoch % every == 0:
        _checkpoint(run, None)
    return _after_step(run, None) or "finished"


def _after_step(run: _Run, fingerprint: str | None) -> str | None:
    """After an optimizer step (or an epoch): samples and timed checkpoints when due. Returns why to stop
    (callback or max_steps; then a checkpoint is saved), else None. All ranks decide alike."""
    config, state = run.config, run.state
    every = config.sample_every_steps
    if every and state.global_step % every == 0 and state.global_step != run.start_step:
        _sample(run)
    every = config.validate_every_steps
    if every and state.global_step % every == 0:
        _validate(run)
    minutes = config.checkpoint_every_minutes
    timed = bool(minutes) and run.runtime.main and time.monotonic() - run.last_checkpoint_time >= minutes * 60
    timed, requested, at_max = (
        v > 0 for v in run.runtime.sum([timed, run.stop_requested, _at_max_steps(run)])
    )
    if timed or requested or at_max:
        _checkpoint(run, fingerprint)
    return "callback" if requested else "max_steps" if at_max else None


def _at_max_steps(run: _Run) -> bool:
    return run.config.max_steps is not None and run.state.global_step >= run.config.max_steps


def _finish(run: _Run, stop_reason: str) -> TrainResult:
    """The final checkpoint and samples, the trained balance plot, the result (also sent as an end event)."""
    run.progress.close()
    state = run.state
    mid_epoch = None if state.batch == 0 else schedule_fingerprint(run.schedule(state.epoch))
    _checkpoint(run, mid_epoch)
    if stop_reason != "callback" and state.global_step > run.start_step:
        _sample(run)
    if run.runtime.main:
        plot_records(run.out, run.dataset)
    result = TrainResult(
        out=str(run.out),
        global_step=state.global_step,
        epoch=state.epoch,
        batch=state.batch,
        stop_reason=stop_reason,
        checkpoint=str(run.last_checkpoint) if run.last_checkpoint is not None else None,
        skipped_steps=state.skipped_steps,
        last_loss=run.last_loss,
        seconds=time.monotonic() - run.started,
    )
    run.say("%s", result)
    _emit(run, TrainEvent("end", state.global_step, state.epoch, result=result))
    return result


# ---------------------------------------------------------------------------------------------------------
# Events, checkpoints and samples during the run


def _emit(run: _Run, event: TrainEvent) -> None:
    """Send an event to TensorBoard and the callback; a True answer asks the run to stop after the current step."""
    if run.tensorboard is not None:
        run.tensorboard(event)
    if run.callback is not None and run.callback(
        dataclasses.replace(event, rank=run.runtime.rank, world_size=run.runtime.world_size)
    ):
        run.stop_requested = True


def _checkpoint(run: _Run, fingerprint: str | None) -> None:
    """Save a checkpoint of the current step (once per step), prune old ones, announce it."""
    state, runtime = run.state, run.runtime
    if state.global_step == run.last_checkpoint_step:
        return
    runtime.barrier()
    folder = run.out / CHECKPOINTS_DIR
    path = folder / f"step-{state.global_step:08d}"
    if runtime.main:
        path = save_checkpoint(
            folder,
            run.components,
            optimizer=run.optimizer,
            lr_scheduler=run.lr_scheduler,
            scaler=run.scaler,
            state=state,
            config=run.config,
            world_size=runtime.world_size,
            schedule_fingerprint=fingerprint,
            metadata=_file_metadata(run),
            extra={"epoch_values": saved_values(run.dataset), "epoch_loss": run.epoch_loss}
            if state.batch
            else None,
            ema=run.ema,
            params=run.params,
        )
        log.info("checkpoint saved: %s", path)
        if run.config.keep_checkpoints:
            for old in find_checkpoints(run.out)[: -run.config.keep_checkpoints]:
                remove_checkpoint(old)
    runtime.barrier()
    run.last_checkpoint, run.last_checkpoint_step, run.last_checkpoint_time = (
        path,
        state.global_step,
        time.monotonic(),
    )
    if runtime.main:
        _emit(run, TrainEvent("checkpoint", state.global_step, state.epoch, path=str(path)))


def _file_metadata(run: _Run) -> dict[str, str]:
    """What a saved model file says about its training (safetensors header text): base model, progress,
    settings and the concept table with its multipliers and loss scales."""
    from .. import __version__

    config, state = run.config, run.state
    concepts = [
        {"concept": c.path, "images": c.n_images, "multiply": c.multiplier, "loss_scale": c.loss_scale}
        for c in run.dataset.concepts
    ]
    return {
        "edtools.version": __version__,
        "edtools.base_model": config.model,
        "edtools.global_step": str(state.global_step),
        "edtools.epoch": str(state.epoch),
        "edtools.resolution": str(config.resolution),
        "edtools.lora_rank": str(config.lora_rank),
        "edtools.concepts": json.dumps(concepts),
    }


def _validate(run: _Run) -> None:
    """Validation loss per concept on the held-out images (once per step), recorded and reported."""
    state, runtime = run.state, run.runtime
    if run.validator is None or state.global_step == run.last_validation_step:
        return
    runtime.barrier()
    if runtime.main:
        trained_text = any(p.requires_grad for e in run.components.text_encoders for p in e.parameters())
        results = run.validator.evaluate(
            run.components, runtime.device, text_frozen=not trained_text, text_cache=run.text_cache
        )
        append_validation(run.out, state.global_step, state.epoch, results)
        run.say(
            "validation at step %d: %s",
            state.global_step,
            ", ".join(f"{c} {loss:.4f}" for c, (loss, _) in results.items()),
        )
        losses = {c: loss for c, (loss, _) in results.items()}
        images = {c: n for c, (_, n) in results.items()}
        _emit(
            run,
            TrainEvent(
                "validation",
                state.global_step,
                state.epoch,
                loss_per_concept=losses,
                images_per_concept=images,
            ),
        )
    runtime.barrier()
    run.last_validation_step = state.global_step


def _sample(run: _Run) -> None:
    """Save a sample grid of the current step (once per step) on the main process."""
    state, runtime = run.state, run.runtime
    if not run.config.sample_prompts or state.global_step == run.last_sample_step:
        return
    runtime.barrier()
    if runtime.main:
        with ema_weights(run.ema, run.params):  # samples show the averaged weights when there are any
            paths = save_samples(
                run.components, run.config, run.out / SAMPLES_DIR, state.global_step, runtime.device
            )
        log.info("samples saved: %s", ", ".join(map(str, paths)))
        _emit(run, TrainEvent("sample", state.global_step, state.epoch, paths=tuple(map(str, paths))))
    runtime.barrier()
    run.last_sample_step = state.global_step


# ---------------------------------------------------------------------------------------------------------
# Data and output folder
