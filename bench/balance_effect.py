"""Does balancing help a rare concept? The tiny model trains from random weights on 60 red circles, 60 blue squares
and 6 green triangles with no balancing, multiply.txt 10 or loss_scale.txt 10; held-out loss per concept."""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from edtools.config import TrainConfig
from edtools.dataset import write_concept_values
from edtools.models.sd import save_components
from edtools.models.tiny import tiny_components
from edtools.train import train
from edtools.train.records import read_csv

# folder: (caption, colour, training images); the shape is the folder name's second word
CONCEPTS = {
    "red_circle": ("a red circle", (210, 40, 40), 60),
    "blue_square": ("a blue square", (40, 60, 210), 60),
    "green_triangle": ("a green triangle", (40, 170, 60), 6),
}
RARE, FACTOR = "green_triangle", 10
COMMON = [c for c in CONCEPTS if c != RARE]
VALIDATION_IMAGES = 16  # per concept, the same for all: the rare concept is judged as reliably as the others
BATCH = 6  # divides 126 and 180: every batch is full, so equal images seen means equal optimizer steps
POINTS = 10  # validations after step 0, at the same steps in every arm
# none: no files; multiply / loss_scale: the rare folder's multiply.txt / loss_scale.txt = FACTOR;
# absent: its loss_scale.txt = 0, a control (the rare images teach nothing: how much do they help at all?)
ARMS = ("none", "multiply", "loss_scale", "absent")
SIDE = 64


def draw(folder: str, rng: np.random.Generator) -> Image.Image:
    """One 64x64 image: the concept's shape in its colour near the centre; size, place (+-3 px), colour and
    the light background vary. (Shapes anywhere in the frame leave nothing concept-specific for the tiny model
    to learn: a model that never saw a triangle then does as well on them; see the section in RESULTS.md.)"""
    _, colour, _ = CONCEPTS[folder]
    image = Image.new("RGB", (SIDE, SIDE), tuple(int(c) for c in rng.integers(150, 231, 3)))
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, rng.integers(-30, 31, 3), strict=True))
    r = rng.uniform(15, 20)
    cx, cy = SIDE / 2 + rng.uniform(-3, 3, 2)
    shape, pen = folder.split("_")[1], ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + 0.7 * r), (cx + r, cy + 0.7 * r)], fill=fill)
    return image


def make_root(root: Path, counts: dict[str, int], rng: np.random.Generator) -> Path:
    """A data root of concept folders; captions come from the file names ("a red circle_003.png")."""
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            draw(folder, rng).save(root / folder / f"{CONCEPTS[folder][0]}_{i:03d}.png")
    return root


def make_model(folder: Path, seed: int, data: Path) -> Path:
    """The tiny model (random weights from `seed`) with its VAE's scaling_factor set, as SD's is, so that the
    training latents have unit variance: the random VAE's latents are ~0.05 at the default factor, which
    leaves nothing concept-specific to learn (the noise alone is predictable from the noisy latents)."""
    components = tiny_components(seed=seed)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.glob("*/*.png"))])
    with torch.no_grad():
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = components.vae.encode(x).latent_dist.mode()
    components.vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return save_components(components, folder)


def images_per_epoch(arm: str) -> int:
    """126 images per epoch; 180 with the rare folder's multiply.txt (6 images x 10)."""
    return sum(n * (FACTOR if arm == "multiply" and c == RARE else 1) for c, (*_, n) in CONCEPTS.items())


def run_arm(arm: str, work: Path, seed: int, epochs: int, lr: float) -> dict:
    """Train one arm in its own copy of the data root (only the rare folder's file differs); its records."""
    data = shutil.copytree(work / "data", work / f"data_{arm}")
    if arm == "multiply":
        write_concept_values(data, RARE, multiplier=FACTOR)
    elif arm in ("loss_scale", "absent"):
        write_concept_values(data, RARE, loss_scale=FACTOR if arm == "loss_scale" else 0)
    steps = epochs * images_per_epoch(arm) // BATCH
    config = TrainConfig(
        data_root=str(data),
        model=str(work / "model"),
        out=str(work / f"run_{arm}"),
        validation_root=str(work / "validation"),
        validate_every_epochs=0,
        validate_every_steps=steps // POINTS,
        epochs=epochs,
        batch_size=BATCH,
        resolution=SIDE,
        lr=lr,
        optimizer="adamw8bit",
        mixed_precision="no",
        seed=seed,
        # the random VAE's posterior std (~1) dwarfs its mean, so sampled latents are mostly noise; real SD's
        # VAE has a tiny std. Cached latents are the mean, which validation uses too (and steps are faster).
        cache_latents="memory",
        device="cpu",
        checkpoint_every_epochs=0,
        progress_bar=False,
    )
    started = time.monotonic()
    result = train(config)
    assert result.global_step == steps, (arm, result.global_step, steps)
    out = Path(config.out)
    validation = read_csv(out / "validation.csv")
    return {
        "arm": arm,
        "seed": seed,
        "epochs": epochs,
        "steps": steps,
        "rare seen": epochs * CONCEPTS[RARE][2] * (FACTOR if arm == "multiply" else 1),
        "seconds": time.monotonic() - started,
        "validation": [(int(r["step"]), r["concept"], float(r["loss"])) for r in validation],
        "training": [
            (int(r["epoch"]), r["concept"], float(r["loss"]), int(r["images"]))
            for r in read_csv(out / "training_loss.csv")
        ],
    }


def summarise(run: dict) -> dict[str, float]:
    """Final validation loss per concept, the rare/common ratio, the rare concept's validation before training
    and half way, and the training loss (plain MSE) per concept: image-weighted mean over the second half."""
    last = max(step for step, _, _ in run["validation"])
    rare = {step: loss for step, c, loss in run["validation"] if c == RARE}
    final = {c: loss for step, c, loss in run["validation"] if step == last}
    trained = {}
    for concept in CONCEPTS:
        rows = [
            (loss, n) for epoch, c, loss, n in run["training"] if c == concept and epoch >= run["epochs"] // 2
        ]
        trained[concept] = sum(loss * n for loss, n in rows) / sum(n for _, n in rows)
    return {
        **{f"val {c}": final[c] for c in CONCEPTS},
        "rare / common": final[RARE] / statistics.mean(final[c] for c in COMMON),
        "rare at step 0": rare[0],
        "rare half way": rare[last // 2],
        "train common": statistics.mean(trained[c] for c in COMMON),
        "train rare": trained[RARE],
    }


def curves(runs: list[dict]) -> dict[int, tuple[float, float]]:
    """step -> (rare concept's validation loss, mean of the common ones), averaged over the runs (seeds)."""
    out = {}
    for step in sorted({s for s, _, _ in runs[0]["validation"]}):
        rare = [loss for run in runs for s, c, loss in run["validation"] if s == step and c == RARE]
        common = [loss for run in runs for s, c, loss in run["validation"] if s == step and c in COMMON]
        out[step] = (statistics.mean(rare), statistics.mean(common))
    return out


def plot(runs: list[dict], path: Path) -> None:
    """Left: the rare concept's validation loss (solid) and the common concepts' mean (dashed) per arm;
    right: their ratio. Means over the seeds; every arm is validated at the same steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    loss_ax, ratio_ax = fig.subplots(1, 2)
    for arm, colour in zip(ARMS, ("tab:gray", "tab:blue", "tab:orange", "tab:red"), strict=True):
        points = curves([r for r in runs if r["arm"] == arm])
        steps, rare, common = list(points), [v[0] for v in points.values()], [v[1] for v in points.values()]
        loss_ax.plot(steps, rare, color=colour, marker="o", ms=3, label=f"{arm}: {RARE}")
        loss_ax.plot(steps, common, color=colour, ls="--", lw=1, label=f"{arm}: common mean")
        ratio_ax.plot(
            steps,
            [r / c for r, c in zip(rare, common, strict=True)],
            color=colour,
            marker="o",
            ms=3,
            label=arm,
        )
    seeds = len({r["seed"] for r in runs})
    loss_ax.set(xlabel="optimizer step", ylabel="validation loss (MSE)", title=f"mean of {seeds} seed(s)")
    loss_ax.set_ylim(top=0.6)
    ratio_ax.set(
        xlabel="optimizer step", ylabel=f"{RARE} / common mean", title="rare vs common validation loss"
    )
    ratio_ax.axhline(1, color="black", lw=0.5)
    loss_ax.legend(fontsize=7, ncol=2)
    ratio_ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(runs: list[dict]) -> str:
    """Markdown: a row per arm and seed, then per arm the mean ± standard deviation over the seeds. The last
    column is the rare concept's final validation loss minus the `none` arm's of the same seed (paired)."""
    summaries = [summarise(run) for run in runs]
    baseline = {
        r["seed"]: s[f"val {RARE}"] for r, s in zip(runs, summaries, strict=True) if r["arm"] == "none"
    }
    for run, summary in zip(runs, summaries, strict=True):
        summary["rare vs none"] = summary[f"val {RARE}"] - baseline[run["seed"]]
    keys = list(summaries[0])
    head = ["arm", "seed", "epochs", "steps", "rare seen", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, summary in zip(runs, summaries, strict=True):
        cells = [run[k] for k in ("arm", "seed", "epochs", "steps", "rare seen")]
        lines.append("| " + " | ".join(map(str, cells + [f"{v:.4f}" for v in summary.values()])) + " |")
    for arm in ARMS:
        mine = [(r, s) for r, s in zip(runs, summaries, strict=True) if r["arm"] == arm]
        run = mine[0][0]
        cells = [f"**{arm}**", f"mean of {len(mine)}", run["epochs"], run["steps"], run["rare seen"]]
        cells += [mean_sd([s[k] for _, s in mine]) for k in keys]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--epochs", type=int, default=30, help="epochs of the arms without multiply.txt (x10)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="data, weights and training")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on a busy 2-core CPU: 3-10x slower)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 epochs, the first seed")
    parser.add_argument("--out", type=Path, help="folder for balance_effect.png (default: a new temp folder)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds = 10, args.seeds[:1]
    # the multiply arm trains fewer epochs (7/10: 180 images each, not 126) so every arm sees as many images
    # and takes as many optimizer steps; the constant learning rate then gives each arm the same budget
    if args.epochs < 10 or args.epochs * images_per_epoch("none") % images_per_epoch("multiply"):
        parser.error("--epochs must be a multiple of 10 (the multiply arm trains 7/10 of them)")
    out = args.out or Path(tempfile.mkdtemp(prefix="balance_effect-"))
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    epochs = {arm: args.epochs * images_per_epoch("none") // images_per_epoch(arm) for arm in ARMS}
    started, runs = time.monotonic(), []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="balance_effect-") as tmp:
            work = Path(tmp)
            rng = np.random.default_rng(seed)
            make_root(work / "data", {c: n for c, (*_, n) in CONCEPTS.items()}, rng)
            make_root(work / "validation", dict.fromkeys(CONCEPTS, VALIDATION_IMAGES), rng)
            make_model(work / "model", seed, work / "data")
            for arm in ARMS:
                runs.append(run_arm(arm, work, seed, epochs[arm], args.lr))
                print(
                    f"seed {seed} {arm}: {runs[-1]['steps']} steps, {runs[-1]['seconds']:.0f} s", flush=True
                )
    print(table(runs))
    plot(runs, out / "balance_effect.png")
    print(f"plot: {out / 'balance_effect.png'}; total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
