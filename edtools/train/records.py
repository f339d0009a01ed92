"""The run's records in its out folder: validation.csv, bleed.csv, balance_history.csv, training_loss.csv, the
list of validation images and the plots drawn from them. Appended as the run goes, trimmed back to a checkpoint on resume;
read back for the balance rules (auto-balance, suggestions).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..dataset.scan import Dataset

if TYPE_CHECKING:
    from ..balance.autobalance import History
    from ..balance.suggest import Suggestion

__all__ = [
    "BALANCE_HISTORY_CSV",
    "BLEED_CSV",
    "TRAINING_LOSS_CSV",
    "VALIDATION_CSV",
    "VALIDATION_IMAGES",
    "SKIPPED_IMAGES",
    "append_balance_history",
    "append_bleed",
    "append_skipped",
    "append_training_loss",
    "append_validation",
    "RECORDS",
    "plot_records",
    "read_csv",
    "read_history",
    "suggest_run",
    "trim_records",
    "write_validation_images",
]

VALIDATION_CSV = "validation.csv"
BLEED_CSV = "bleed.csv"
BALANCE_HISTORY_CSV = "balance_history.csv"
TRAINING_LOSS_CSV = "training_loss.csv"
VALIDATION_IMAGES = "validation_images.txt"
SKIPPED_IMAGES = "skipped_images.txt"
_COLUMNS = {
    VALIDATION_CSV: ["step", "epoch", "concept", "loss", "images", "train_loss", "gap"],
    BLEED_CSV: ["step", "epoch", "concept", "under", "margin"],
    BALANCE_HISTORY_CSV: [
        "epoch",
        "concept",
        "multiply",
        "loss_scale",
        "expected",
        "actual",
        "user_multiply",
        "reason",
    ],
    TRAINING_LOSS_CSV: ["epoch", "concept", "loss", "images"],
}
RECORDS = (
    *_COLUMNS,
    VALIDATION_IMAGES,
    SKIPPED_IMAGES,
    "validation.png",
    "bleed.png",
    "balance_actual.png",
)  # a fresh run removes them


def _append(path: Path, rows: Sequence[Sequence]) -> None:
    new = not path.exists()
    if not new and read_header(path) != _COLUMNS[path.name]:  # written before columns were added: renew
        old = read_csv(path)
        path.unlink()
        _append(path, [[row.get(c) or "" for c in _COLUMNS[path.name]] for row in old])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(_COLUMNS[path.name])
        writer.writerows(rows)


def read_header(path: Path) -> list[str]:
    """The column names of a record (empty when the file does not exist or is empty)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as file:
        return next(csv.reader(file), [])


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a record (empty when the file does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def trim_records(out: Path, *, global_step: int, epoch: int) -> None:
    """Drop rows written after a checkpoint (by a run that died before its next one): a resumed run appends
    them again, so its records equal an uninterrupted run's."""
    for name, column, last in (
        (VALIDATION_CSV, "step", global_step),
        (BLEED_CSV, "step", global_step),
        (BALANCE_HISTORY_CSV, "epoch", epoch - 1),
        (TRAINING_LOSS_CSV, "epoch", epoch - 1),
    ):
        path = out / name
        rows = read_csv(path)
        kept = [row for row in rows if int(row[column]) <= last]
        if len(kept) != len(rows):
            path.unlink()
            _append(path, [[row.get(c) or "" for c in _COLUMNS[name]] for row in kept])


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def append_validation(
    out: Path,
    step: int,
    epoch: int,
    results: Mapping[str, tuple[float, int]],
    train_loss: Mapping[str, float] | None = None,
    gap: Mapping[str, float] | None = None,
) -> None:
    """One row per concept: step, epoch, concept, loss, images, train_loss (the same loss on a fixed sample of
    its training images) and gap (loss - train_loss); the last two empty where not measured."""
    train_loss, gap = train_loss or {}, gap or {}
    rows = [
        [step, epoch, c, f"{loss:.6g}", n, _number(train_loss.get(c)), _number(gap.get(c))]
        for c, (loss, n) in results.items()
    ]
    _append(out / VALIDATION_CSV, rows)


def append_bleed(out: Path, step: int, epoch: int, margins: Mapping[tuple[str, str], float]) -> None:
    """One row per (concept, under) pair: step, epoch, concept, under, margin (see bleed.bleed_margins).
    Nothing is written (not even the header) while there are no margins."""
    if margins:
        rows = [[step, epoch, c, under, f"{m:.6g}"] for (c, under), m in margins.items()]
        _append(out / BLEED_CSV, rows)


def append_balance_history(
    out: Path,
    epoch: int,
    dataset: Dataset,
    actual: np.ndarray,
    user: Mapping[str, float] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> None:
    """One row per concept for a finished epoch: the multiplier and loss_scale it trained with, the images
    per epoch they give (expected), the images the epoch really held (actual), the user's multiplier (the
    files or sliders; it differs from multiply where --auto-balance changed it) and the automatic change's
    reason (empty where none)."""
    user, reasons = user or {}, reasons or {}
    rows = [
        [
            epoch,
            c.path,
            f"{c.multiplier:g}",
            f"{c.loss_scale:g}",
            f"{c.images_per_epoch:g}",
            int(n),
            f"{user.get(c.path, c.multiplier):g}",
            reasons.get(c.path, ""),
        ]  # fmt: skip
        for c, n in zip(dataset.concepts, actual, strict=True)
    ]
    _append(out / BALANCE_HISTORY_CSV, rows)


def append_training_loss(out: Path, epoch: int, sums: Mapping[str, tuple[float, int]]) -> None:
    """One row per concept for a finished epoch: the mean training loss (plain MSE) of its images."""
    rows = [[epoch, c, f"{total / n:.6g}", n] for c, (total, n) in sums.items() if n]
    _append(out / TRAINING_LOSS_CSV, rows)


def append_skipped(out: Path, epoch: int, skipped: Sequence[tuple[str, str]]) -> None:
    """out/skipped_images.txt gains a line per image that could not be decoded while training: epoch, path
    (relative to the data root), why. Those images are left out of their batch; the run goes on."""
    path = out / SKIPPED_IMAGES
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        for image, why in skipped:
            file.write(f"epoch {epoch}\t{image}\t{why}\n")


def write_validation_images(out: Path, validation: Dataset) -> Path:
    """out/validation_images.txt: the held-out images, one path (relative to its data root) per line."""
    path = out / VALIDATION_IMAGES
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# validation images under {validation.root}, never trained\n"
    path.write_text(header + "".join(p + "\n" for p in validation.paths), encoding="utf-8")
    return path


def plot_records(out: Path, dataset: Dataset) -> None:
    """out/balance_actual.png (expected images per concept beside each trained epoch's) and, with a
    validation, out/validation.png (validation loss per concept over the steps, and the memorisation gap) and
    out/bleed.png (the latest validation's bleed margins)."""
    from ..balance.report import plot_balance
    from .metric_plots import plot_bleed, plot_validation_gap

    history = read_csv(out / BALANCE_HISTORY_CSV)
    epochs = sorted({int(row["epoch"]) for row in history})
    if epochs:
        index = {c: i for i, c in enumerate(dataset.concept_paths)}
        actual = np.zeros((len(epochs), len(index)))
        for row in history:
            if row["concept"] in index:
                actual[epochs.index(int(row["epoch"])), index[row["concept"]]] = float(row["actual"])
        plot_balance(
            dataset,
            actual,
            out=out / "balance_actual.png",
            title=f"Images per concept: expected vs trained, {len(epochs)} epoch(s)",
        )
    validation = read_csv(out / VALIDATION_CSV)
    if validation:
        # an epoch's training loss is drawn at the step where it ended: the first validation after it
        end_step: dict[int, int] = {}
        for row in validation:
            done = int(row["epoch"])
            end_step[done] = min(end_step.get(done, int(row["step"])), int(row["step"]))
        training = [
            {"step": str(end_step[int(r["epoch"]) + 1]), "concept": r["concept"], "loss": r["loss"]}
            for r in read_csv(out / TRAINING_LOSS_CSV)
            if int(r["epoch"]) + 1 in end_step
        ]
        plot_validation_gap(validation, training=training, out=out / "validation.png")
    bleed = read_csv(out / BLEED_CSV)
    if bleed:
        plot_bleed(bleed, out=out / "bleed.png")


def read_history(out: str | Path) -> History:
    """A run's records, as the auto-balance rules read them from its out folder (missing files are empty)."""
    from ..balance.autobalance import History

    out = Path(out)
    return History(
        validation=tuple(read_csv(out / VALIDATION_CSV)),
        bleed=tuple(read_csv(out / BLEED_CSV)),
        balance=tuple(read_csv(out / BALANCE_HISTORY_CSV)),
        training=tuple(read_csv(out / TRAINING_LOSS_CSV)),
    )


def suggest_run(run_dir: str | Path) -> list[Suggestion]:
    """Suggestions from a run's out folder: validation.csv, balance_history.csv, training_loss.csv, bleed.csv."""
    from ..balance.suggest import suggest
    from ..errors import EdtoolsError

    run_dir = Path(run_dir).expanduser()
    validation = read_csv(run_dir / VALIDATION_CSV)
    if not validation:
        raise EdtoolsError(
            f"{run_dir} has no {VALIDATION_CSV}: train with a validation (validation_split, e.g. 0.1, or "
            "validation_root) to get suggestions"
        )
    return suggest(
        validation,
        read_csv(run_dir / BALANCE_HISTORY_CSV),
        read_csv(run_dir / TRAINING_LOSS_CSV),
        read_csv(run_dir / BLEED_CSV),
    )
