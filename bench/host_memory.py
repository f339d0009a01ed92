"""Peak host memory of `edtools train --dry-run` per preset, from a single file and from a diffusers folder.

Builds real-size SD1.5 and SDXL models with random weights (bench/configs.py, fp16, nothing downloaded), writes
each as an fp16 single file (edtools convert's format) and an fp16 diffusers folder, then runs the dry run of each
preset on the CPU with the preset's precision (fp16) in a fresh process, as a user would:

    python bench/host_memory.py                      # every preset, both sources (about 20 GB of disk in --dir)
    python bench/host_memory.py --preset sdxl-lora-t4 --source file

Per run: the loading peak the dry run measured itself (resident in all and anonymous; a memory-mapped model file's
pages are resident but not anonymous: the kernel can drop and re-read them), and the whole process's peak
resident set from the kernel (VmHWM). The goals are a free Colab runtime's 12.7 GB of RAM.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from configs import ARCHITECTURES  # bench/ is on sys.path when a script runs
from models import build_components, tokenizers_for

GIB = 2**30
# (anonymous, total) GiB at most while loading, per preset run from a single file (issue goals: a free Colab
# runtime has 12.7 GB and holds the notebook's kernel and the data loader too)
GOALS = {"sdxl-lora-t4": (3.0, 9.0), "sd15-full-t4": (None, 6.0)}
PRESETS = {
    "sd": ("sd15-full-t4", "sd15-lora-t4"),
    "sdxl": ("sdxl-lora-t4",),
}


def build_models(architecture: str, folder: Path) -> tuple[Path, Path]:
    """(single file, diffusers folder) of a real-size random-weight model, both fp16."""
    import torch

    from edtools.models import save_components, save_single_file

    file, model_folder = folder / f"{architecture}.safetensors", folder / f"{architecture}-diffusers"
    if file.is_file() and (model_folder / "model_index.json").is_file():
        return file, model_folder
    configs = ARCHITECTURES[architecture]
    dtypes = {"unet": torch.float16, "vae": torch.float16, "text_encoder": torch.float16}
    dtypes["text_encoder_2"] = torch.float16
    started = time.monotonic()
    components = build_components(configs, tokenizers_for(architecture), dtypes, "cpu")
    save_single_file(components, file, dtype="fp16")
    save_components(components, model_folder)
    print(
        f"built {architecture}: {file.stat().st_size / GIB:.2f} GiB file and a folder "
        f"in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return file, model_folder


def data_root(folder: Path) -> Path:
    root = folder / "data"
    if not root.is_dir():
        subprocess.run(
            [sys.executable, "-m", "edtools", "make-demo", str(root)], check=True, capture_output=True
        )
    return root


_MEASURED = re.compile(r"loading the model peaked at ([\d.]+) GiB resident, ([\d.]+) GiB anonymous")
# The CLI, then the kernel's high-water mark of this process's resident set. Not wait4's ru_maxrss: a child
# started by vfork/posix_spawn inherits its parent's high-water mark at exec, and this script's own peak
# (building SDXL) would show up as the dry run's.
_CLI_THEN_PEAK = """
import re, sys
from edtools.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print("process peak kB", re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
sys.exit(code)
"""
_PEAK = re.compile(r"process peak kB (\d+)")


def dry_run(preset: str, model: Path, model_config: Path, root: Path, out: Path) -> dict:
    """One dry run in a fresh process: its own loading measure and the kernel's peak RSS of the process."""
    command = [
        sys.executable, "-c", _CLI_THEN_PEAK, "train", "--dry-run", "--preset", preset, "--device", "cpu",
        "--mixed-precision", "fp16", "--model", str(model), "--model-config", str(model_config),
        "--data-root", str(root), "--out", str(out), "--no-progress-bar",
    ]  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as stdout_file, tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(command, stdout=stdout_file, stderr=stderr_file, text=True)
        status = process.wait()
        stdout_file.seek(0)
        stderr_file.seek(0)
        stdout, stderr = stdout_file.read(), stderr_file.read()
    seconds = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"dry run of {preset} from {model} failed:\n{stderr[-3000:]}")
    found, peak = _MEASURED.search(stdout), _PEAK.search(stdout)
    if found is None or peak is None:
        raise SystemExit(f"dry run of {preset} printed no host memory line:\n{stdout}")
    return {
        "loading_total": float(found.group(1)),
        "loading_anonymous": float(found.group(2)),
        "process_peak": int(peak.group(1)) * 1024 / GIB,
        "seconds": seconds,
    }


def verdict(preset: str, source: str, row: dict) -> str:
    anonymous, total = GOALS.get(preset, (None, None))
    if source != "file" or total is None:
        return ""
    ok = row["loading_total"] <= total and (anonymous is None or row["loading_anonymous"] <= anonymous)
    goal = f"<= {anonymous} anon, " if anonymous is not None else ""
    return f"{'meets' if ok else 'MISSES'} the goal ({goal}<= {total} total)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where the models are built (kept for reuse); default: a temp folder")
    parser.add_argument("--preset", action="append", help="only these presets (repeat)")
    parser.add_argument("--source", choices=("file", "folder"), action="append", help="only these sources")
    args = parser.parse_args()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="edtools-host-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    root = data_root(folder)
    rows = []
    try:
        for architecture, presets in PRESETS.items():
            presets = [p for p in presets if not args.preset or p in args.preset]
            if not presets:
                continue
            file, model_folder = build_models(architecture, folder)
            for preset in presets:
                for source in args.source or ("file", "folder"):
                    model = file if source == "file" else model_folder
                    row = dry_run(preset, model, model_folder, root, folder / "out")
                    rows.append((preset, source, row))
                    print(
                        f"{preset:<14} {source:<7} loading {row['loading_anonymous']:.2f} GiB anonymous, "
                        f"{row['loading_total']:.2f} GiB resident; process peak {row['process_peak']:.2f} GiB "
                        f"({row['seconds']:.0f} s) {verdict(preset, source, row)}",
                        flush=True,
                    )
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    print(
        "\n| preset | from | loading: anonymous GiB | loading: resident GiB | process peak RSS GiB | goal |"
    )
    print("|---|---|---|---|---|---|")
    for preset, source, row in rows:
        print(
            f"| {preset} | {'fp16 single file' if source == 'file' else 'fp16 diffusers folder'} | "
            f"{row['loading_anonymous']:.2f} | {row['loading_total']:.2f} | {row['process_peak']:.2f} | "
            f"{verdict(preset, source, row)} |"
        )


if __name__ == "__main__":
    main()
