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
from balance_data import (  # bench/ is on sys.path when a script runs
    NEW_CONCEPTS,
    PRESERVATION,
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

COMMON = tuple(c for c in NEW_CONCEPTS if c != RARE)
CONCEPTS = (*NEW_CONCEPTS, PRESERVATION)
# bumped when the data drawn or the pretraining changes, so no stale cached base model is reused
BASE_VERSION = 1


@dataclass(frozen=True)
class Arm:
    """How the fine-tune balances the rare folder: multiply.txt / loss_scale.txt values (as config overrides,
    which act as the files do), caption dropout and tag shuffling on it alone, or auto_balance."""

    name: str
    what: str
    multiplier: float | None = None
    loss_scale: float | None = None
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    auto: bool = False

    def config_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if self.multiplier is not None:
            values["multipliers"] = {RARE: self.multiplier}
        if self.loss_scale is not None:
            values["loss_scales"] = {RARE: self.loss_scale}
        if self.caption_dropout:
            values["caption_dropouts"] = {RARE: self.caption_dropout}
        if self.shuffle_tags:
            values["shuffle_tags_concepts"] = [RARE]
            values["keep_tags"] = 1  # the trigger word stays first, as kohya's keep_tokens does
        if self.auto:
            values["auto_balance"] = True
        return values


ARMS = (
    Arm("none", "no balancing"),
    Arm("multiply3", "multiply.txt 3", multiplier=3),
    Arm("multiply10", "multiply.txt 10", multiplier=10),
    Arm("loss_scale10", "loss_scale.txt 10", loss_scale=10),
    Arm("multiply10_aug", "multiply.txt 10, caption dropout 0.2, tags shuffled", 10, None, 0.2, True),
    Arm("auto", "auto_balance", auto=True),
    # the usual advice followed (repeat the small folder ten times) with auto_balance on: does it undo the harm?
    Arm("auto10", "multiply.txt 10 and auto_balance", multiplier=10, auto=True),
)
FIXED = tuple(a.name for a in ARMS if a.name != "none" and not a.auto)
# a control, run when asked (--arms ... absent): the rare images load but teach nothing (loss_scale 0), which
# shows how much they help at all, i.e. whether the set-up can see an effect on the rare concept
ABSENT = Arm("absent", "loss_scale.txt 0 (control)", loss_scale=0)


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


# ---------------------------------------------------------------------------------------------------------
# The comparison


def _forgetting(run: dict[str, Any]) -> float:
    """Held-out loss on the base family now minus the base model's (step 0): > 0 is forgetting."""
    return run["loss"][PRESERVATION] - run["start"][PRESERVATION]


def _values(runs: list[dict[str, Any]], arm: str, metric: str, concept: str) -> dict[int, float | None]:
    """seed -> the arm's value (None where not recorded)."""
    out = {}
    for run in runs:
        if run["arm"] == arm:
            out[run["seed"]] = _forgetting(run) if metric == "forgetting" else run[metric][concept]
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _paired(runs: list[dict[str, Any]], arm: str, other: str, metric: str, concept: str) -> list[float]:
    """arm minus other, per seed, over the seeds both have."""
    mine, theirs = _values(runs, arm, metric, concept), _values(runs, other, metric, concept)
    return [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]  # type: ignore[operator]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _label(concept: str) -> str:
    return f"{concept} (rare)" if concept == RARE else concept


def table(runs: list[dict[str, Any]]) -> str:
    """Three markdown tables, a row per arm: held-out loss per concept and forgetting (mean ± sd over the
    seeds); the same as paired differences from none (mean ± sd, and in how many seeds the arm was lower); gap
    and bleed per concept at the last step ("n/a" where this edtools does not record them)."""
    arms = [a.name for a in (*ARMS, ABSENT) if any(r["arm"] == a.name for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    for arm in arms:  # paired: every arm ran on every seed
        missing = set(seeds) - {r["seed"] for r in runs if r["arm"] == arm}
        if missing:
            raise ValueError(f"arm {arm} lacks seed(s) {sorted(missing)}: the arms are compared per seed")
    metrics = [*(("loss", c) for c in CONCEPTS), ("forgetting", "")]
    names = [_label(c) for c in CONCEPTS] + ["forgetting"]
    loss = [_row(["held-out loss", *names]), "|" + "---|" * (len(names) + 1)]
    paired = [_row(["arm - none, same seed (lower in)", *names]), "|" + "---|" * (len(names) + 1)]
    extra_names = [f"gap {c}" for c in CONCEPTS] + [f"bleed {c}" for c in CONCEPTS]
    extra = [_row(["last step", *extra_names]), "|" + "---|" * (len(extra_names) + 1)]
    for arm in arms:
        loss.append(_row([arm] + [_mean_sd(list(_values(runs, arm, m, c).values())) for m, c in metrics]))
        if arm != "none":
            cells = [arm]
            for m, c in metrics:
                diff = _paired(runs, arm, "none", m, c)
                cells.append(f"{_mean_sd(diff)} ({sum(d < 0 for d in diff)}/{len(diff)})")
            paired.append(_row(cells))
        cells = [arm]
        for metric in ("gap", "bleed"):
            for c in CONCEPTS:
                values = [v for v in _values(runs, arm, metric, c).values() if v is not None]
                cells.append(_mean_sd(values) if len(values) == len(seeds) else "n/a")
        extra.append(_row(cells))
    tables = [loss, paired, extra]
    if "auto" in arms:  # what the controller did: the multipliers the last epoch trained with, per seed
        concepts = list(CONCEPTS)
        ended = [_row(["auto, last epoch's multiplier", *map(_label, concepts), "changes"])]
        ended.append("|" + "---|" * (len(concepts) + 2))
        for run in sorted((r for r in runs if r["arm"] == "auto"), key=lambda r: r["seed"]):
            held = run.get("multipliers", {})
            cells = [f"seed {run['seed']}"] + [f"{held[c]:g}" if c in held else "n/a" for c in concepts]
            ended.append(_row([*cells, str(len(run.get("changes", ())))]))
        tables.append(ended)
    return "\n\n".join("\n".join(part) for part in tables)


def verdict(runs: list[dict[str, Any]]) -> list[str]:
    """The target, checked: auto's rare loss at most none's and the best fixed arm's in 5 of 6 seeds (the same
    share of other seed counts), and the common concepts and preservation no worse than none by more than the
    seeds' spread (none's standard deviation over the seeds)."""
    if not any(r["arm"] == "auto" for r in runs):
        return ["target: not checked (no auto arm)"]
    seeds = sorted({r["seed"] for r in runs})
    need = math.ceil(5 / 6 * len(seeds))
    fixed = [a for a in FIXED if any(r["arm"] == a for r in runs)]
    best = min(fixed, key=lambda a: statistics.mean(_values(runs, a, "loss", RARE).values()))
    lines, ok = [], True
    for other in ("none", best):
        diff = _paired(runs, "auto", other, "loss", RARE)
        wins = sum(d <= 0 for d in diff)
        ok &= wins >= need
        lines.append(f"rare ({RARE}): auto <= {other} in {wins} of {len(diff)} seeds (need {need})")
    for concept, metric in [*((c, "loss") for c in COMMON), (PRESERVATION, "loss"), ("", "forgetting")]:
        diff = statistics.mean(_paired(runs, "auto", "none", metric, concept))
        spread = statistics.stdev(_values(runs, "none", metric, concept).values()) if len(seeds) > 1 else 0.0
        ok &= diff <= spread
        name = concept or "forgetting"
        lines.append(f"{name}: auto - none = {diff:+.4f} (spread of none over the seeds {spread:.4f})")
    lines.append(f"target {'met' if ok else 'NOT met'} (best fixed arm on the rare concept: {best})")
    if any(r["arm"] == "auto10" for r in runs):  # auto started from the usual advice, multiply.txt 10
        for other in ("multiply10", "none"):
            diff = _paired(runs, "auto10", other, "loss", RARE)
            if diff:
                lines.append(
                    f"rare ({RARE}): auto10 - {other} = {statistics.mean(diff):+.4f}, lower in "
                    f"{sum(d < 0 for d in diff)} of {len(diff)} seeds"
                )
    return lines


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
