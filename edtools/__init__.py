"""edtools: balanced multi-concept Stable Diffusion fine-tuning from folders of captioned images.

Scan a data root (multiply.txt, loss_scale.txt), build exact per-epoch schedules, report the balance, train.
"""

from .balance.schedule import EpochSchedule, build_epoch, epoch_images, make_buckets, shard, write_schedule
from .dataset.scan import Concept, Dataset, DatasetError, Problem, ScanResult, load_dataset, scan

__all__ = [
    "Concept",
    "Dataset",
    "DatasetError",
    "EpochSchedule",
    "Problem",
    "ScanResult",
    "build_epoch",
    "epoch_images",
    "load_dataset",
    "make_buckets",
    "scan",
    "shard",
    "write_schedule",
]
__version__ = "0.1.0"
