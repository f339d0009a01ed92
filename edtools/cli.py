"""The `edtools` command line: scan, schedule, make-demo, make-tiny-model, convert, train, suggest.

Each subcommand is a thin shell over the package's functions; exit code 2 means the data or config is wrong.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .errors import EdtoolsError

__all__ = ["main"]

log = logging.getLogger("edtools")


def _print_scan(result) -> None:
    for line in result.log:
        print(line)
    if result.problems:
        print()
        for problem in result.problems:
            print(problem)


def cmd_scan(args: argparse.Namespace) -> int:
    from .balance.report import format_table
    from .dataset.scan import scan

    result = scan(args.data_root, cache=not args.no_cache, kohya_repeats=args.kohya_repeats)
    _print_scan(result)
    if result.dataset.concepts:
        print()
        print(format_table(result.dataset, args.batch_size))
    if result.errors:
        print(f"\n{len(result.errors)} error(s): fix them before training.", file=sys.stderr)
        return 2
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from .balance.report import format_table, plot_balance
    from .balance.schedule import build_epoch, make_buckets, write_schedule
    from .dataset.scan import scan

    result = scan(args.data_root, kohya_repeats=args.kohya_repeats)
    _print_scan(result)
    if result.errors:
        print(f"\n{len(result.errors)} error(s): no schedule written.", file=sys.stderr)
        return 2
    dataset = result.dataset
    out = Path(args.out)
    buckets = make_buckets(args.resolution)
    counts = []
    steps = []
    for epoch in range(args.epochs):
        schedule = build_epoch(
            dataset, epoch=epoch, seed=args.seed, batch_size=args.batch_size, buckets=buckets
        )
        write_schedule(schedule, dataset, out)
        counts.append(schedule.images_per_concept(dataset))
        steps.append(schedule.n_batches)
    print()
    print(format_table(dataset, args.batch_size, steps_per_epoch=steps[0] if steps else None))
    import numpy as np

    actual = np.stack(counts) if counts else None
    plot_balance(dataset, actual, out=out / "balance.png")
    print(
        f"\nwrote {args.epochs} schedule file(s) ep0..ep{args.epochs - 1}_batch_schedule.txt and balance.png to {out}"
    )
    print(f"steps per epoch: {', '.join(map(str, steps))}")
    return 0


def cmd_make_demo(args: argparse.Namespace) -> int:
    from .demo import make_demo_dataset

    root = make_demo_dataset(args.dir)
    print(f"demo data root written to {root}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .models import make_tiny_model
    from .models.families import family

    shorthand = {"sdxl": args.sdxl, "sd3": args.sd3, "flux-dev": args.flux}
    architecture = next((name for name, asked in shorthand.items() if asked), args.architecture)
    path = make_tiny_model(
        args.dir,
        architecture,
        seed=args.seed,
        prediction_type=args.prediction_type,
        real_blocks=args.real_blocks,
    )
    print(f"tiny {family(architecture).variant_label(architecture)}-shaped diffusers model written to {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .errors import ModelError
    from .models import load_components, save_components, save_single_file
    from .models.families import family

    destination = Path(args.dst).expanduser()
    single = destination.suffix.lower() == ".safetensors"
    if destination.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelError(
            f"{destination}: edtools writes single files as .safetensors only (AUTOMATIC1111, ComfyUI and "
            "Forge load them, and unlike .ckpt they cannot carry code); name it "
            f"{destination.with_suffix('.safetensors').name}"
        )
    if destination.resolve() == Path(args.src).expanduser().resolve():
        raise ModelError(f"{destination} is the source itself: choose another destination")
    dtype = args.dtype or ("fp16" if single else "fp32")
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    # read in the dtype written: an SDXL file converts within a free Colab's RAM (never a float32 copy)
    components = load_components(args.src, model_config=args.config, dtype=torch_dtype)
    if single:
        path = save_single_file(components, destination, dtype=dtype)
        print(f"{family(components.architecture).short_label} single file ({dtype}) written to {path}")
    else:
        components.vae.to(torch_dtype)  # the one part loaded in float32 when its config asks (force_upcast)
        path = save_components(components, destination)
        print(f"{family(components.architecture).short_label} diffusers folder ({dtype}) written to {path}")
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    from .balance.suggest import format_suggestions
    from .train.records import suggest_run

    suggestions = suggest_run(args.run_dir)
    print(format_suggestions(suggestions))
    changed = [s for s in suggestions if s.changes]
    if not changed:
        return 0
    if not args.apply:
        print(
            "\n* suggested changes; nothing was written. --apply writes them to the data root's multiply.txt files"
        )
        return 0
    from .dataset.scan import write_concept_values

    data_root = args.data_root or _run_data_root(Path(args.run_dir))
    for s in changed:
        for path in write_concept_values(data_root, s.concept, multiplier=s.suggested):
            print(f"wrote {path}: {s.suggested:g}")
    return 0


def _run_data_root(run_dir: Path) -> str:
    """The data root a run trained on, from its newest checkpoint's config."""
    import json

    from .errors import EdtoolsError
    from .train import find_checkpoints

    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        raise EdtoolsError(f"{run_dir} has no checkpoint that names its data root: give --data-root")
    config = json.loads((checkpoints[-1] / "resume" / "config.json").read_text(encoding="utf-8"))
    return config["data_root"]


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, read_config_file
    from .flags import from_args
    from .train import train

    try:
        base = read_config_file(args.config) if args.config else None
        config = from_args(args, base=base)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        from .train.plan import check_run, format_plan

        print(format_plan(check_run(config)))
        return 0
    from .train.outdir import OutFolderGone

    try:
        result = train(config)  # it logs its own summary; expected failures reach main's error boundary
    except OutFolderGone as exc:  # the drive went away: once it is back, the run resumes from its checkpoint
        print(f"error: {exc}", file=sys.stderr)
        if exc.checkpoint is not None:
            print(
                f"\nOnce the out folder is back, continue from {exc.checkpoint}:\n  {_resume_command(args)}"
            )
        return 2
    if result.stop_reason == "interrupted":
        print(
            f"\ninterrupted: checkpoint {result.checkpoint}. To continue where it stopped:\n"
            f"  {_resume_command(args)}"
        )
        return 130
    if result.stop_reason == "data_root_gone":
        print(
            f"error: the data root {config.data_root} disappeared during the run (a Drive that was unmounted?); "
            f"the run stopped with checkpoint {result.checkpoint}",
            file=sys.stderr,
        )
        print(f"\nOnce the data root is back, continue where it stopped:\n  {_resume_command(args)}")
        return 2
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    """The command line of this run, to continue it from its newest checkpoint."""
    argv = [a for a in getattr(args, "argv", []) if a not in ("--resume", "--overwrite")]
    return " ".join(["edtools", *map(shlex.quote, argv), "--resume"])


KOHYA_HELP = "folders named the kohya way (10_alice) without a multiply.txt: the number is their multiplier"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edtools", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="scan a data root: per-folder table, applied files, warnings and errors")
    p.add_argument("data_root")
    p.add_argument("--batch-size", type=int, default=4, help="for the steps column (default 4)")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not write the image size manifest")
    p.add_argument("--kohya-repeats", action="store_true", help=KOHYA_HELP)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("schedule", help="write ep{N}_batch_schedule.txt files and balance.png")
    p.add_argument("data_root")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=555)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--out", required=True, help="folder for the schedule files and balance.png")
    p.add_argument("--kohya-repeats", action="store_true", help=KOHYA_HELP)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("make-demo", help="write the demo data root (drawn with PIL, no downloads)")
    p.add_argument("dir")
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("make-tiny-model", help="write a tiny SD-shaped diffusers model (tests, demo)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    from .models.families import variants

    p.add_argument("--architecture", choices=variants(), default="sd1")
    p.add_argument("--sdxl", action="store_true", help="same as --architecture sdxl")
    p.add_argument("--sd3", action="store_true", help="same as --architecture sd3")
    p.add_argument("--flux", action="store_true", help="same as --architecture flux-dev (Flux.1 dev)")
    p.add_argument("--real-blocks", action="store_true", help="the real models' block structure (slower)")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser(
        "convert",
        help="convert between a diffusers folder and a single .safetensors file (AUTOMATIC1111 / ComfyUI layout)",
    )
    p.add_argument("src", help="a diffusers folder, a single .safetensors/.ckpt file or a hub id")
    p.add_argument("dst", help="ending in .safetensors: a single file; anything else: a diffusers folder")
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        help="weights' type (default fp16 for a file, fp32 for a folder)",
    )
    p.add_argument(
        "--config", help="for a single-file source: a diffusers folder or hub id with its component configs"
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "suggest", help="propose multipliers per concept from a run's validation and balance history"
    )
    p.add_argument("run_dir", help="a training run's out folder (with validation.csv)")
    p.add_argument("--apply", action="store_true", help="write the suggested multiply.txt files")
    p.add_argument("--data-root", help="where to write them (default: the run's data root)")
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser("train", help="train a Stable Diffusion model on a data root")
    p.add_argument("--config", help="YAML or JSON file with TrainConfig fields; flags given here override it")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="do everything before the first step (load the model as kept, scan, hold out, plan, make the "
        "optimizer), print the plan with the host memory measured, write nothing",
    )
    try:
        from .flags import add_arguments
    except ImportError:  # the training extras are missing: the other subcommands still work
        add_arguments = None
    if add_arguments is not None:
        add_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except EdtoolsError as exc:  # bad data, setting, model or path: the message alone, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path of the user's: a bug, keep its traceback
        print(f"error: {_os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: nothing half-saved is kept
        print("\ninterrupted", file=sys.stderr)
        return 130


def _os_error_message(exc: OSError) -> str:
    """An OS error on one of the user's paths, said with the path and what to do."""
    import errno

    path = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    advice = {
        errno.EACCES: "check its permissions (or choose a folder you can write)",
        errno.EPERM: "check its permissions (or choose a folder you can write)",
        errno.ENOSPC: "the drive is full: free space or choose another drive",
        errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
        errno.EISDIR: "it is a folder where a file was expected: check the path",
        errno.ENOENT: "it does not exist: check the path",
        errno.EROFS: "the drive is read-only: choose a writable folder",
    }.get(exc.errno, "check the path")
    return f"{path}: {exc.strerror or exc}; {advice}"


if __name__ == "__main__":
    sys.exit(main())
