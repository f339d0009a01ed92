"""The training loop: train(config, callback) trains exactly the batches the scheduler produced, epoch by epoch.

train() reads top to bottom; each part (start, one epoch, end of epoch, checkpoint, samples, finish) is a
function over one Run that holds the run's state. Random draws depend only on (seed, epoch, rank, batch).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..balance.schedule import (
    expected_images_per_epoch,
    make_buckets,
    shard,
    write_schedule,
)
from ..config import ConfigError, TrainConfig
from ..errors import require
from .checkpoint import (
    TrainState,
    check_resume,
    checkpoint_info,
    load_checkpoint,
    schedule_fingerprint,
)
from .ema import ema_step, make_ema
from .events import TrainEvent, TrainResult
from .outdir import OutLock, prepare_out
from .rebalance import BalanceSource, auto_epoch, epoch_values, saved_auto, with_saved_values
from .records import (
    SKIPPED_IMAGES,
    append_balance_history,
    append_skipped,
    append_training_loss,
    plot_records,
    trim_records,
    write_validation_images,
)
from .run import (
    Run,
    checkpoint_now,
    data_root_gone,
    emit,
    guard_out,
    interrupts,
    sample_now,
    validate_now,
)
from .runtime import Runtime, make_runtime
from .setup import (
    configure_noise,
    fill_text_cache,
    load_data,
    load_model,
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
    from tqdm.contrib.logging import logging_redirect_tqdm

    # log lines go above the progress bar (tqdm.write) instead of being written into it
    with interrupts() as signals, logging_redirect_tqdm():
        run = _start(config, callback, balance)
        run.signals = signals
        try:
            if run.state.global_step == 0 and run.state.batch == 0 and not run.interrupted:
                validate_now(run)  # before training: where each concept starts
            stop_reason = "max_steps" if _at_max_steps(run) else "finished"
            while stop_reason == "finished" and run.state.epoch < config.epochs:
                if run.interrupted:  # while setting up, or between epochs
                    stop_reason = "interrupted"
                    break
                if run.state.batch == 0 and (config.live_balance or config.auto_balance or _auto_left(run)):
                    _rebalance(run)
                stop_reason = _train_epoch(run, run.state.epoch)
                if stop_reason == "finished":
                    stop_reason = _end_epoch(run)
            return _finish(run, stop_reason)
        finally:
            run.lock.release()


def _start(
    config: TrainConfig, callback: Callable[[TrainEvent], bool | None] | None, balance: BalanceSource | None
) -> Run:
    """Lock the out folder, check it and the resume settings, load the model, scan the data and hold out the
    validation images, build the optimizer and the LR / fp16 loss-scale schedules, restore a checkpoint's state."""
    started = time.monotonic()
    runtime = make_runtime(config)
    out = Path(config.out).expanduser()
    lock = OutLock(out)
    if runtime.main:
        lock.acquire()
    try:
        return _build(config, callback, balance, runtime, out, lock, started)
    except BaseException:
        lock.release()
        raise


def _build(
    config: TrainConfig,
    callback: Callable[[TrainEvent], bool | None] | None,
    balance: BalanceSource | None,
    runtime: Runtime,
    out: Path,
    lock: Any,
    started: float,
) -> Run:
    """_start's work once the out folder is locked."""
    from tqdm.auto import tqdm

    from .bleed import concept_prompts
    from .validate import Validator

    resume_from = prepare_out(config, out, runtime)
    info = checkpoint_info(resume_from) if resume_from is not None else {}
    components = load_model(config, runtime, resume_from)
    config = resolve_config(config, components, runtime)
    configure_noise(components, config)
    if resume_from is not None:
        check_resume(info, config, runtime.world_size, resume_from)
    dataset, validation = load_data(config, runtime.main)
    # a folder that is not a concept: say so now
    concept_prompts(dataset, validation, config.prompt_overrides)
    user_multipliers, balance_reasons = {c.path: c.multiplier for c in dataset.concepts}, {}
    if info.get("epoch_values") and info.get("batch"):  # resumed mid-epoch: that epoch's own values
        dataset = with_saved_values(dataset, info["epoch_values"])
        user, balance_reasons = saved_auto(info["epoch_values"])
        user_multipliers.update({c: v for c, v in user.items() if c in user_multipliers})
    buckets = make_buckets(config.resolution)

    # the captions are encoded before the denoiser is placed on the GPU (kept_as leaves it on the CPU then), so
    # the text encoders (T5-XXL) and the denoiser never share it; T5 is freed after (fill_text_cache)
    captions = dataset.captions + (validation.captions if validation is not None else ())
    captions += tuple(prompt for _, prompt in config.concept_prompts)  # bleed is measured under them
    text_cache = (
        fill_text_cache(components, captions, config, runtime) if config.cache_text_embeddings else None
    )
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
    validator = None
    if validation is not None and len(validation):
        validator = Validator(
            validation, config, buckets, components.noise_scheduler.config.num_train_timesteps, dataset
        )
        if runtime.main:
            write_validation_images(out, validation)
    if config.auto_balance and validator is None:
        raise ConfigError(
            "auto_balance decides from the validation loss per concept, and this run holds out no images: set "
            "validation_split (e.g. 0.1) or validation_root, or auto_balance false"
        )
    progress = tqdm(
        total=planned,
        initial=state.global_step,
        unit="step",
        disable=not (config.progress_bar and runtime.main),
        dynamic_ncols=True,
    )
    run = Run(
        config=config,
        callback=callback,
        balance=balance,
        lock=lock,
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
        user_multipliers=user_multipliers,
        balance_reasons=balance_reasons,
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


def _rebalance(run: Run) -> None:
    """At an epoch's start with live_balance or auto_balance: this epoch's multipliers and loss scales (the
    files or the notebook's sliders, then the automatic changes), and the LR schedule and progress bar
    stretched or shrunk to the steps that now remain."""
    config, epoch = run.config, run.state.epoch
    user = run.dataset.with_values(run.user_multipliers, {})  # the user's values of the last epoch
    if config.live_balance:
        user = epoch_values(user, config, epoch, run.balance)
    run.user_multipliers = {c.path: c.multiplier for c in user.concepts}
    run.dataset, run.balance_reasons = user, {}
    if config.auto_balance:
        run.dataset, run.balance_reasons = auto_epoch(
            user, run.out, epoch, config.auto_balance_bounds, run.runtime
        )
    planned = planned_steps(run.config, run.dataset, run.buckets, run.state, run.runtime.world_size)
    if planned != run.planned_steps:
        state = run.lr_scheduler.state_dict()
        run.lr_scheduler = make_lr_scheduler(run.config, run.optimizer, planned)
        run.lr_scheduler.load_state_dict(state)  # same position, new length
        run.planned_steps = planned
        run.progress.total = planned
        run.progress.refresh()


def _auto_left(run: Run) -> bool:
    """A run resumed mid-epoch without auto_balance after one with it: that epoch's automatic values end."""
    return any(c.multiplier != run.user_multipliers.get(c.path, c.multiplier) for c in run.dataset.concepts)


def _train_epoch(run: Run, epoch: int) -> str:
    """Train this rank's batches of one epoch from where the state stands. Returns "finished" at the
    epoch's end, else why it stopped early (callback or max_steps; a checkpoint is then saved)."""
    torch = require("torch")
    from ..data import ScheduleBatches, concept_caption_settings, make_loader

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
        caption_settings=concept_caption_settings(config, concepts),
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
        # a Drive unmounted mid-run: stop with a checkpoint rather than train empty batches
        if data_root_gone(run, batch):
            return "data_root_gone"
        if batch["skipped_images"]:
            guard_out(run)  # listing them must not recreate an out folder that went away
            for image, why in batch["skipped_images"]:
                log.warning("epoch %d: skipped %s (%s); listed in %s", epoch, image, why, SKIPPED_IMAGES)
            append_skipped(run.out, epoch, batch["skipped_images"])
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
        emit(
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


def _end_epoch(run: Run) -> str:
    """Count the epoch as done, record and report its images and loss per concept, validate and save the
    epoch's checkpoint when due."""
    epoch = run.state.epoch
    run.state = TrainState(run.state.global_step, epoch + 1, 0, run.state.skipped_steps)
    dataset, concepts = run.dataset, run.dataset.concept_paths
    trained = run.schedule(epoch).images_per_concept(dataset)
    expected = expected_images_per_epoch(dataset)
    guard_out(run)  # the records must not recreate an out folder that went away
    if run.runtime.main:
        append_balance_history(run.out, epoch, dataset, trained, run.user_multipliers, run.balance_reasons)
        append_training_loss(run.out, epoch, {c: (s, int(n)) for c, (s, n) in run.epoch_loss.items()})
    run.epoch_loss = {}
    emit(
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
        validate_now(run)
    every = run.config.checkpoint_every_epochs
    if every and run.state.epoch % every == 0:
        checkpoint_now(run, None)
    return _after_step(run, None) or "finished"


def _after_step(run: Run, fingerprint: str | None) -> str | None:
    """After an optimizer step (or an epoch): samples and timed checkpoints when due. Returns why to stop
    (callback or max_steps; then a checkpoint is saved), else None. All ranks decide alike."""
    config, state = run.config, run.state
    guard_out(run)  # once a step: an out folder that went away stops the run (it is never recreated)
    every = config.sample_every_steps
    if every and state.global_step % every == 0 and state.global_step != run.start_step:
        sample_now(run)
    every = config.validate_every_steps
    if every and state.global_step % every == 0:
        validate_now(run)
    minutes = config.checkpoint_every_minutes
    timed = bool(minutes) and run.runtime.main and time.monotonic() - run.last_checkpoint_time >= minutes * 60
    flags = [timed, run.stop_requested, _at_max_steps(run), run.interrupted is not None]
    timed, requested, at_max, interrupted = (v > 0 for v in run.runtime.sum(flags))
    if timed or requested or at_max or interrupted:
        checkpoint_now(run, fingerprint)
    return "interrupted" if interrupted else "callback" if requested else "max_steps" if at_max else None


def _at_max_steps(run: Run) -> bool:
    return run.config.max_steps is not None and run.state.global_step >= run.config.max_steps


def _finish(run: Run, stop_reason: str) -> TrainResult:
    """The final checkpoint and samples, the trained balance plot, the result (also sent as an end event)."""
    run.progress.close()
    state = run.state
    mid_epoch = None if state.batch == 0 else schedule_fingerprint(run.schedule(state.epoch))
    checkpoint_now(run, mid_epoch)
    if stop_reason in ("finished", "max_steps") and state.global_step > run.start_step:
        sample_now(run)  # not after a stop that was asked for or forced
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
    emit(run, TrainEvent("end", state.global_step, state.epoch, result=result))
    return result
