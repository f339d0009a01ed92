"""Loop overhead: edtools' train() against a bare hand-written training loop on the tiny model, same batches.

Both read the same ScheduleBatches, use AdamW8bit, clip at 1.0 and train UNet + text encoder; time per optimizer
step is measured between consecutive steps (setup and the final checkpoint excluded). Goal: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edtools.balance.schedule import build_epoch
from edtools.config import TrainConfig
from edtools.data import ScheduleBatches, make_loader
from edtools.dataset.scan import load_dataset
from edtools.models import load_components, make_tiny_model
from edtools.train import train

WARMUP_STEPS = 5


def make_data(root: Path, per_concept: int = 24) -> Path:
    """Two concept folders of random 64x64 PNGs, one with multiply.txt 1.5 and one with loss_scale.txt 2."""
    rng = np.random.default_rng(0)
    for concept in ("alice", "style"):
        folder = root / concept
        folder.mkdir(parents=True)
        for i in range(per_concept):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{concept}_{i:03d}.png")
    (root / "alice" / "multiply.txt").write_text("1.5")
    (root / "style" / "loss_scale.txt").write_text("2")
    return root


def seconds_per_step(stamps: list[float]) -> float:
    """Median gap between consecutive optimizer steps after the warmup steps."""
    return statistics.median(np.diff(stamps[WARMUP_STEPS:]))


def edtools_loop(config: TrainConfig) -> float:
    stamps: list[float] = []
    train(config, lambda event: stamps.append(time.perf_counter()) if event.kind == "step" else None)
    return seconds_per_step(stamps)


def bare_loop(config: TrainConfig) -> float:
    """What a short diffusers-style script does: no events, no per-concept bookkeeping, no checkpoints."""
    import bitsandbytes as bnb
    import torch

    components = load_components(config.model)
    vae, unet, text_encoder = components.vae, components.unet, components.text_encoder
    scheduler = components.noise_scheduler
    vae.requires_grad_(False).eval()
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    dataset = load_dataset(config.data_root)
    stamps = []
    for epoch in range(config.epochs):
        schedule = build_epoch(
            dataset, epoch=epoch, seed=config.seed, batch_size=config.batch_size, resolution=config.resolution
        )
        loader = make_loader(ScheduleBatches(dataset, schedule, components.tokenizer, seed=config.seed))
        for batch in loader:
            generator = torch.Generator().manual_seed(epoch * 100_000 + batch["batch"])
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator)
                latents = latents * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator
            )
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(batch["input_ids"])[0]
            pred = unet(noisy, timesteps, hidden).sample
            per_image = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
            loss = (per_image * batch["loss_scale"]).sum() / config.batch_size
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())  # edtools reads the loss every step too (logging, NaN check)
            stamps.append(time.perf_counter())
    return seconds_per_step(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6, help="runs of each loop, alternating")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # steadier timings on a shared machine
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edtools-bench-") as tmp:
        tmp = Path(tmp)
        config = TrainConfig(
            data_root=str(make_data(tmp / "data")),
            model=str(make_tiny_model(tmp / "model")),
            out=str(tmp / "out"),
            epochs=args.epochs,
            batch_size=args.batch_size,
            resolution=64,
            lr=1e-4,
            checkpoint_every_epochs=0,
            progress_bar=False,
            device="cpu",
        )
        dataset = load_dataset(config.data_root)
        steps = sum(
            build_epoch(
                dataset, epoch=e, seed=config.seed, batch_size=config.batch_size, resolution=64
            ).n_batches
            for e in range(config.epochs)
        )
        import torch

        print(
            f"tiny model, resolution 64, batch {config.batch_size}, {steps} steps per run, CPU, "
            f"{torch.get_num_threads()} torch thread(s)"
        )
        bare, ours = [], []
        for round_ in range(args.rounds):
            order = ("bare", "edtools") if round_ % 2 == 0 else ("edtools", "bare")  # no order effect
            for loop in order:
                if loop == "bare":
                    bare.append(bare_loop(config))
                else:
                    ours.append(edtools_loop(dataclasses.replace(config, out=str(tmp / f"out{round_}"))))
            print(
                f"round {round_ + 1}: bare {bare[-1] * 1e3:.2f} ms/step, edtools {ours[-1] * 1e3:.2f} ms/step"
            )
        bare_s, ours_s = statistics.median(bare), statistics.median(ours)
        print(
            f"bare loop:    {bare_s * 1e3:.2f} ms/step (median of {args.rounds} runs, best {min(bare) * 1e3:.2f})"
        )
        print(
            f"edtools loop: {ours_s * 1e3:.2f} ms/step (median of {args.rounds} runs, best {min(ours) * 1e3:.2f})"
        )
        print(f"ratio of the best runs: {min(ours) / min(bare):.3f}")
        print(f"ratio edtools / bare (medians): {ours_s / bare_s:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
