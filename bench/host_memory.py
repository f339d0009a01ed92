"""Peak host memory of `edtools train --dry-run` per preset, from a single file and from a diffusers folder.

Builds real-size SD1.5, SDXL, SD3.5 Medium and Flux.1 dev models with random weights (bench/configs.py,
bench/memory_flow.py; nothing downloaded), writes the UNet models as fp16 single files (edtools convert's format)
and fp16 diffusers folders, the flow-matching ones as diffusers folders in their hub dtype (SD3.5 Medium fp16,
Flux bf16; bench/flow_models.py writes them tensor by tensor) and also as single files without T5 (as people
download them; T5 then comes from the folder), and SD3.5 as ComfyUI's file with T5-XXL inside in scaled float8
(source file-t5: sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors' layout) and with its transformer in scaled
float8 (source file-fp8: sd3.5_large_fp8_scaled.safetensors' layout, no T5). Then it runs each preset's dry run
on the CPU with the preset's precision in a fresh process, as a user would:

    python bench/host_memory.py --dir /big/disk          # every preset (about 100 GB of disk)
    python bench/host_memory.py --preset sdxl-lora-t4 --source file

Per run: the loading peak the dry run measured itself (resident in all and anonymous; a memory-mapped model file's
pages are resident but not anonymous: the kernel can drop and re-read them), and the whole process's peak
resident set from the kernel (VmHWM). The goals are a free Colab runtime's 12.7 GB of RAM, and for Flux the RAM
of the runtimes it needs. On a machine without a CUDA GPU the quantised loads (QLoRA's NF4 transformer, the 8-bit
T5) run on the CPU, the GPU gates lifted as the tests lift them: the quantised weights then stay in host RAM,
where a GPU run moves each to the GPU as it is quantised, so those rows are upper bounds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from configs import ARCHITECTURES  # bench/ is on sys.path when a script runs
from flow_models import build_flow_folder, write_flux_single_file, write_scaled_fp8
from models import build_components, tokenizers_for

GIB = 2**30
# (anonymous, total) GiB at most while loading, per (preset, source). A free Colab runtime has 12.7 GB and holds
# the notebook's kernel and the data loader too (issue goals: SDXL and SD1.5 from a single file; SD3.5 Medium
# alike). Flux needs Colab's L4 runtime (53 GB of RAM) or A100 (83.5 GB): its goal is that RAM less 5 GB.
GOALS = {
    ("sdxl-lora-t4", "file"): (3.0, 9.0),
    ("sd15-full-t4", "file"): (None, 6.0),
    ("sd35m-lora-t4", "file"): (None, 9.0),
    ("sd35m-lora-t4", "folder"): (None, 9.0),
    ("sd35m-lora-t4", "file-t5"): (None, 9.0),
    ("sd35m-lora-t4", "file-fp8"): (None, 9.0),
    ("flux-lora-24gb", "file"): (None, 44.0),
    ("flux-lora-24gb", "folder"): (None, 44.0),
    ("flux-lora-40gb", "file"): (None, 73.0),
    ("flux-lora-40gb", "folder"): (None, 73.0),
}
PRESETS = {
    "sd": ("sd15-full-t4", "sd15-lora-t4"),
    "sdxl": ("sdxl-lora-t4",),
    "sd3": ("sd35m-lora-t4",),
    "flux": ("flux-lora-24gb", "flux-lora-40gb"),
}


def build_models(architecture: str, folder: Path, sources: list[str] | None = None) -> dict[str, Path]:
    """{source: model} of a real-size random-weight model: "file" (a single file), "folder" (diffusers) and
    for SD3.5 "file-t5" (the file with T5-XXL in scaled float8) and "file-fp8" (its transformer in scaled
    float8), each written when `sources` asks for it (None: all)."""
    import torch

    from edtools.models import Keep, load_components, save_components, save_single_file

    if architecture in ("sd3", "flux"):
        model_folder = build_flow_folder(architecture, folder / f"{architecture}-diffusers")
        if architecture == "flux":  # as people download it: transformer, VAE, CLIP-L in bf16 (no T5)
            return {
                "file": write_flux_single_file(model_folder, folder / "flux.safetensors"),
                "folder": model_folder,
            }
        file = folder / f"{architecture}.safetensors"
        if not file.is_file():  # transformer, CLIP-L/-G and VAE, as SD3.5 files are shared
            keep = Keep(dtype=torch.float16, t5="drop")
            save_single_file(load_components(str(model_folder), keep=keep), file, dtype="fp16")
        models = {"file": file, "folder": model_folder}
        if sources is None or "file-t5" in sources:
            t5_file = folder / f"{architecture}-t5xxlfp8scaled.safetensors"
            models["file-t5"] = write_scaled_fp8(file, t5_file, t5_folder=model_folder)
        if sources is None or "file-fp8" in sources:
            fp8_file = folder / f"{architecture}-fp8-scaled.safetensors"
            models["file-fp8"] = write_scaled_fp8(file, fp8_file)
        return models
    file, model_folder = folder / f"{architecture}.safetensors", folder / f"{architecture}-diffusers"
    if file.is_file() and (model_folder / "model_index.json").is_file():
        return {"file": file, "folder": model_folder}
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
    return {"file": file, "folder": model_folder}


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
import os, re, sys
if os.environ.get("EDTOOLS_BENCH_CPU_QUANTIZATION") == "1":
    # no CUDA GPU: only the environment gates are lifted, loading and quantising are the real ones
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer
    from edtools.models import quantize
    BnB4BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None
    quantize.cuda_present = lambda: True
from edtools.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print("process peak kB", re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
sys.exit(code)
"""
_PEAK = re.compile(r"process peak kB (\d+)")


def dry_run(preset: str, model: Path, model_config: Path, root: Path, out: Path) -> dict:
    """One dry run in a fresh process, in the preset's precision: its own loading measure and the kernel's peak
    RSS of the process."""
    import torch

    from edtools.presets import PRESETS as EDTOOLS_PRESETS

    command = [
        sys.executable, "-c", _CLI_THEN_PEAK, "train", "--dry-run", "--preset", preset, "--device", "cpu",
        "--mixed-precision", EDTOOLS_PRESETS[preset].settings["mixed_precision"], "--model", str(model),
        "--model-config", str(model_config), "--data-root", str(root), "--out", str(out), "--no-progress-bar",
    ]  # fmt: skip
    settings = EDTOOLS_PRESETS[preset].settings
    quantizes = settings.get("t5") == "8bit" or settings.get("quantize_base", "none") != "none"
    cpu_quantization = quantizes and not torch.cuda.is_available()
    environment = dict(os.environ, EDTOOLS_BENCH_CPU_QUANTIZATION=str(int(cpu_quantization)))
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as stdout_file, tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(
            command, stdout=stdout_file, stderr=stderr_file, text=True, env=environment
        )
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
        "cpu_quantization": cpu_quantization,
    }


def verdict(preset: str, source: str, row: dict) -> str:
    anonymous, total = GOALS.get((preset, source), (None, None))
    if total is None:
        return ""
    ok = row["loading_total"] <= total and (anonymous is None or row["loading_anonymous"] <= anonymous)
    goal = f"<= {anonymous} anon, " if anonymous is not None else ""
    bound = "; an upper bound: quantised parts stayed in host RAM (no GPU)" if row["cpu_quantization"] else ""
    return f"{'meets' if ok else 'MISSES'} the goal ({goal}<= {total} total{bound})"


def source_label(architecture: str, source: str) -> str:
    if source == "file-t5":
        return "fp16 single file, T5 inside in scaled fp8"
    if source == "file-fp8":
        return "single file, transformer in scaled fp8 (no T5)"
    if source == "file":
        if architecture == "flux":
            return "bf16 single file (no T5)"
        return "fp16 single file" + (" (no T5)" if architecture == "sd3" else "")
    return f"{'bf16' if architecture == 'flux' else 'fp16'} diffusers folder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where the models are built (kept for reuse); default: a temp folder")
    parser.add_argument("--preset", action="append", help="only these presets (repeat)")
    parser.add_argument(
        "--source",
        choices=("file", "folder", "file-t5", "file-fp8"),
        action="append",
        help="only these sources",
    )
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
            models = build_models(architecture, folder, args.source)
            for preset in presets:
                for source in args.source or tuple(models):
                    if source not in models:
                        continue
                    row = dry_run(preset, models[source], models["folder"], root, folder / "out")
                    rows.append(
                        (preset, source_label(architecture, source), verdict(preset, source, row), row)
                    )
                    print(
                        f"{preset:<14} {source:<7} loading {row['loading_anonymous']:.2f} GiB anonymous, "
                        f"{row['loading_total']:.2f} GiB resident; process peak {row['process_peak']:.2f} GiB "
                        f"({row['seconds']:.0f} s) {rows[-1][2]}",
                        flush=True,
                    )
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    print(
        "\n| preset | from | loading: anonymous GiB | loading: resident GiB | process peak RSS GiB | goal |"
    )
    print("|---|---|---|---|---|---|")
    for preset, label, goal, row in rows:
        print(
            f"| {preset} | {label} | {row['loading_anonymous']:.2f} | {row['loading_total']:.2f} | "
            f"{row['process_peak']:.2f} | {goal} |"
        )


if __name__ == "__main__":
    main()
