"""Does balancing help a rare concept when fine-tuning? A tiny base model, pretrained on shapes x colours, learns
three trigger-word concepts (one ten times rarer) beside a preservation folder; arms balance the rare one."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from balance_compare import ABSENT, ARMS, CONCEPTS, Arm, table, verdict
from balance_data import (  # bench/ is on sys.path when a script runs
    RARE,
    SIDE,
    DataSizes,
    write_base_root,
    write_finetune_root,
    write_validation_root,
)
from PIL import Image

from edtools.config import TrainConfig
from edtools.models.sd import save_components
from edtools.models.tiny import tiny_components
from edtools.train import train
from edtools.train.records import read_csv

__all__ = [
    "ABSENT",
    "ARMS",
    "QUICK",
    "Arm",
    "Settings",
    "auto_available",
    "bench",
    "main",
    "pretrain",
    "table",
]

log = logging.getLogger("balance_effect")

# bumped when the data drawn or the pretraining changes, so no stale cached base model is reused
BASE_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """The bench's sizes. Fine-tuning arms all take `steps` optimizer steps (max_steps), whatever their epoch
    size, and are validated at the same steps (every steps // points) and after each epoch."""

    sizes: DataSizes = field(default_factory=DataSizes)
    pretrain_steps: int = 1200
    pretrain_lr: float = 1e-3
    steps: int = 480
    lr: float = 5e-4
    batch: int = 6
    points: int = 4

    def pretrain_key(self, seed: int) -> str:
        """The cache key of a base model: everything its weights depend on."""
        facts = {
            "version": BASE_VERSION,
            "seed": seed,
            "base_per_kind": self.sizes.base_per_kind,
            "steps": self.pretrain_steps,
            "lr": self.pretrain_lr,
            "batch": self.batch,
            "side": SIDE,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


# --quick and the test: small enough to show the machinery works, too small to show an effect
QUICK = Settings(
    sizes=DataSizes(
        base_per_kind=1,
        common=6,
        rare=2,
        preservation_per_kind=1,
        validation_per_concept=2,
        validation_per_kind=1,
    ),
    pretrain_steps=8,
    steps=8,
    batch=4,
    points=2,
)


def auto_available() -> bool:
    """Whether this edtools has auto_balance (the auto arm is skipped, and says so, where it has not)."""
    return "auto_balance" in {f.name for f in dataclasses.fields(TrainConfig)}


def _base_config(**values: Any) -> TrainConfig:
    return TrainConfig(
        resolution=SIDE,
        optimizer="adamw8bit",
        mixed_precision="no",
        # the tiny random VAE's posterior std (~1) dwarfs its mean: train on the cached mean, as validation does
        cache_latents="memory",
        device="cpu",
        num_workers=0,
        checkpoint_every_epochs=0,
        progress_bar=False,
        **values,
    )


def _scaled_model(folder: Path, seed: int, data: Path) -> Path:
    """Random tiny weights from `seed`, with the VAE's scaling_factor set (as SD's is) so the training latents
    have unit variance: at the default factor the random VAE's latents are ~0.05 and carry nothing to learn."""
    components = tiny_components(seed=seed)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.glob("**/*.png"))])
    with torch.no_grad():
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = components.vae.encode(x).latent_dist.mode()
    components.vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return save_components(components, folder)


def pretrain(seed: int, settings: Settings, cache: Path) -> Path:
    """The base model of `seed`: the tiny model trained from random weights on the whole base family through
    edtools' own train(). Kept in cache/<key>/model and reused by any run with the same seed and settings."""
    folder = cache / settings.pretrain_key(seed)
    if (folder / "model" / "model_index.json").is_file():
        return folder / "model"
    with tempfile.TemporaryDirectory(prefix="pretrain-", dir=_mkdir(cache)) as tmp:
        work = Path(tmp)
        data = write_base_root(work / "data", seed, settings.sizes)
        config = _base_config(
            data_root=str(data),
            model=str(_scaled_model(work / "random", seed, data)),
            out=str(work / "run"),
            epochs=10_000,
            max_steps=settings.pretrain_steps,
            batch_size=settings.batch,
            lr=settings.pretrain_lr,
            seed=seed,
            validate_every_epochs=0,
        )
        result = train(config)
        assert result.global_step == settings.pretrain_steps, result.global_step
        staged = work / "model"
        shutil.copytree(result.checkpoint, staged, ignore=shutil.ignore_patterns("resume"))
        folder.mkdir(parents=True, exist_ok=True)
        staged.rename(folder / "model")  # whole or not at all: a cut-off pretraining is redone
    return folder / "model"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_run(out: Path, steps: int) -> dict[str, Any]:
    """A run's final numbers per concept: held-out loss at the last step and at step 0 (the base model); gap
    (validation.csv's column, at the last validation that gives one) and bleed (bleed.csv's mean margin over
    the other concepts at its last step) where this edtools records them, else None."""
    rows = read_csv(out / "validation.csv")
    at = {(int(r["step"]), r["concept"]): r for r in rows}
    if (steps, RARE) not in at:
        raise RuntimeError(f"{out}/validation.csv has no validation at step {steps}")
    final = {c: float(at[steps, c]["loss"]) for c in CONCEPTS}
    start = {c: float(at[0, c]["loss"]) for c in CONCEPTS}
    # gap: at the last validation that has one (a record may give it at some validations only)
    gap: dict[str, float | None] = dict.fromkeys(CONCEPTS)
    for step, c in sorted(at):
        if c in gap and _number(at[step, c].get("gap")) is not None:
            gap[c] = _number(at[step, c].get("gap"))
    bleed: dict[str, float | None] = dict.fromkeys(CONCEPTS)
    bleed_rows = read_csv(out / "bleed.csv")
    if bleed_rows:
        last = max(int(r["step"]) for r in bleed_rows)
        for c in CONCEPTS:
            margins = [
                _number(r.get("margin")) for r in bleed_rows if int(r["step"]) == last and r["concept"] == c
            ]
            margins = [m for m in margins if m is not None]
            bleed[c] = statistics.mean(margins) if margins else None
    # the multipliers the last epoch trained with, and the automatic changes that led there with their reasons
    history = read_csv(out / "balance_history.csv")
    last_epoch = max((int(r["epoch"]) for r in history), default=None)
    multipliers = {r["concept"]: float(r["multiply"]) for r in history if int(r["epoch"]) == last_epoch}
    changes = [
        f"epoch {r['epoch']} {r['concept']} x{float(r['multiply']):g}: {r['reason']}"
        for r in history
        if r.get("reason")
    ]
    return {
        "loss": final,
        "start": start,
        "gap": gap,
        "bleed": bleed,
        "multipliers": multipliers,
        "changes": changes,
    }


def run_arm(arm: Arm, seed: int, settings: Settings, base: Path, work: Path) -> dict[str, Any]:
    """Fine-tune the base model on the seed's data root with one arm's balance; its numbers."""
    config = _base_config(
        data_root=str(work / "data"),
        model=str(base),
        out=str(work / f"run_{arm.name}"),
        validation_root=str(work / "validation"),
        validate_every_epochs=1,
        validate_every_steps=settings.steps // settings.points,
        epochs=10_000,
        max_steps=settings.steps,
        batch_size=settings.batch,
        lr=settings.lr,
        seed=seed,
        **arm.config_values(),
    )
    started, cpu = time.monotonic(), time.process_time()
    result = train(config)
    assert result.global_step == settings.steps, (arm.name, result.global_step)
    return {
        "arm": arm.name,
        "seed": seed,
        "seconds": time.monotonic() - started,
        "cpu_seconds": time.process_time() - cpu,
        **read_run(Path(config.out), settings.steps),
    }


def seed_runs(
    seed: int, settings: Settings, cache: Path, arms: tuple[Arm, ...], say: Any = print
) -> list[dict[str, Any]]:
    """Every arm on one seed: the same base model, data root, held-out images and validation noise."""
    started, cpu = time.monotonic(), time.process_time()
    base = pretrain(seed, settings, cache)
    say(
        f"seed {seed}: base model {base} ({time.monotonic() - started:.0f} s, {time.process_time() - cpu:.0f} s CPU)"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="balance_effect-") as tmp:
        work = Path(tmp)
        write_finetune_root(work / "data", seed, settings.sizes)
        write_validation_root(work / "validation", seed, settings.sizes)
        for arm in arms:
            runs.append(run_arm(arm, seed, settings, base, work))
            say(
                f"seed {seed} {arm.name}: {settings.steps} steps, {runs[-1]['seconds']:.0f} s "
                f"({runs[-1]['cpu_seconds']:.0f} s CPU)"
            )
    return runs


def _worker(seed: int, settings: Settings, cache: Path, arms: tuple[Arm, ...], threads: int) -> list[dict]:
    """seed_runs in a worker process of --jobs, with its own torch threads."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    return seed_runs(seed, settings, cache, arms, say=lambda line: print(line, flush=True))


def bench(
    seeds: list[int],
    settings: Settings,
    cache: Path,
    arms: tuple[Arm, ...] = ARMS,
    say: Any = print,
    jobs: int = 1,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Every arm on every seed: their runs, in seed order. jobs > 1 runs that many seeds at once, each in its
    own process (seeds are independent; one process per core is the fastest use of a small CPU)."""
    if any(a.auto for a in arms) and not auto_available():
        say("auto arm skipped: this edtools's TrainConfig has no auto_balance field")
        arms = tuple(a for a in arms if not a.auto)
    if jobs <= 1 or len(seeds) <= 1:
        return [run for seed in seeds for run in seed_runs(seed, settings, cache, arms, say)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked torch can hang in its thread pools
    with ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = [pool.submit(_worker, seed, settings, cache, arms, threads) for seed in seeds]
        return [run for part in parts for run in part.result()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument(
        "--steps", type=int, help=f"fine-tuning optimizer steps per arm (default {Settings.steps})"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a busy CPU)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        help="seeds trained at once, one process of --threads each (default: one per CPU core)",
    )
    names = [a.name for a in (*ARMS, ABSENT)]
    parser.add_argument(
        "--arms", nargs="+", choices=names, default=[a.name for a in ARMS], help="arms to run (none always)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, the first seed")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "edtools-balance-effect",
        help="where base models are kept, by seed and settings",
    )
    parser.add_argument("--out", type=Path, help="also write the runs as JSON here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    if settings.steps % settings.points:
        parser.error(f"--steps must be a multiple of {settings.points} (the validation points)")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    arms = tuple(a for a in (*ARMS, ABSENT) if a.name == "none" or a.name in args.arms)
    runs = bench(args.seeds, settings, args.cache, arms, jobs=args.jobs, threads=args.threads)
    print(table(runs))
    print("\n".join(verdict(runs)))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "balance_effect.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
    print(f"total {time.monotonic() - started:.0f} s for {len(args.seeds)} seed(s)")


if __name__ == "__main__":
    main()
