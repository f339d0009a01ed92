"""The command line on real data roots: scan, schedule, make-demo, exit codes and files written.

Runs main() in process, and `python -m edtools` once as a subprocess to check the entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edtools.cli import main
from edtools.dataset.scan import load_dataset
from edtools.demo import DEMO_CONCEPTS


def test_make_demo_then_scan(tmp_path, capsys):
    assert main(["make-demo", str(tmp_path / "demo")]) == 0
    dataset = load_dataset(tmp_path / "demo")
    assert len(dataset.concepts) >= 4
    counts = {c.path: c.n_images for c in dataset.concepts}
    assert counts == {k: v[0] for k, v in DEMO_CONCEPTS.items()}
    assert {(int(w), int(h)) for w, h in zip(dataset.widths, dataset.heights, strict=True)} >= {
        (96, 96),
        (128, 96),
    }
    assert any(c.multiplier == 0.1 for c in dataset.concepts)
    assert any(c.loss_scale != 1 for c in dataset.concepts)
    capsys.readouterr()
    assert main(["scan", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "multiply.txt in 'preservation' = 0.1: 200 images -> 20 per epoch" in out
    assert "total" in out


def test_scan_exit_code_2_on_errors(tree, capsys):
    root = tree({"a": 2})
    (root / "a" / "multiply.txt").write_text("0,5")
    assert main(["scan", str(root)]) == 2
    captured = capsys.readouterr()
    assert "a/multiply.txt" in captured.out and "0.5" in captured.out
    assert "error" in captured.err


def test_scan_and_schedule_apply_kohya_folder_names_when_asked(tree, tmp_path, capsys):
    root = tree({"10_alice": 2, "bob": 3})
    assert main(["scan", str(root)]) == 0
    assert "named the kohya way (10 repeats)" in capsys.readouterr().out
    assert main(["scan", str(root), "--kohya-repeats"]) == 0
    assert "kohya folder name '10_alice' = 10: 2 images -> 20 per epoch" in capsys.readouterr().out
    out = tmp_path / "schedule"
    assert main(["schedule", str(root), "--kohya-repeats", "--out", str(out), "--batch-size", "1"]) == 0
    lines = (out / "ep0_batch_schedule.txt").read_text().splitlines()
    assert sum("10_alice/" in line for line in lines) == 20 and sum("bob/" in line for line in lines) == 3


def test_schedule_writes_files_and_histogram(tree, tmp_path, capsys):
    root = tree({"people/a": 6, "people/b": 2}, sizes=((64, 64), (48, 96)))
    (root / "people" / "b" / "multiply.txt").write_text("3")
    out = tmp_path / "sched"
    assert main(["schedule", str(root), "--epochs", "3", "--batch-size", "2", "--out", str(out)]) == 0
    for e in range(3):
        lines = (out / f"ep{e}_batch_schedule.txt").read_text().splitlines()
        assert len(lines) == 12
    assert (out / "balance.png").stat().st_size > 1000
    assert "steps per epoch" in capsys.readouterr().out


def test_schedule_refuses_bad_data(tree, tmp_path):
    root = tree({"a": 2})
    (root / "a" / "multiply.txt").write_text("-1")
    assert main(["schedule", str(root), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_python_dash_m_entry_point(tree):
    root = tree({"a": 1})
    done = subprocess.run(
        [sys.executable, "-m", "edtools", "scan", str(root)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout


# In a fresh process (the libraries warn once per process): every WARNING record of the loggers named, by
# logger and level, never by wording (other libraries' messages change between releases).
_RECORD_WARNINGS = """
import json, logging, sys
seen = []
class Seen(logging.Handler):
    def emit(self, record):
        seen.append(record.name)
for root in ("kernels", "bitsandbytes", "transformers", "diffusers"):
    logging.getLogger(root).addHandler(Seen(logging.WARNING))
from edtools.cli import main
code = main(sys.argv[1:])
during = list(seen)
for name in AFTER:  # the same loggers once the model is loaded: nothing else is hidden
    logging.getLogger(name).warning("after the load")
print(json.dumps({"code": code, "during": during, "after": seen[len(during):]}))
"""
# The sources hidden: bitsandbytes' CPU kernel probe and its hub lookup, transformers' lazy-import fallbacks.
HIDDEN = ("kernels", "bitsandbytes.backends.cpu", "transformers.utils.import_utils")
AFTER = ("kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils")


def test_loading_a_model_hides_only_the_warnings_that_need_no_action(tmp_path):
    """bitsandbytes' 4-bit CPU kernel probe (its `kernels` hub lookup included) and transformers' image-processor
    fallbacks: said on every model load, nothing for a user to do. Hidden where they come from, and only
    there: the same loggers still speak afterwards."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"AFTER = {AFTER!r}\n{_RECORD_WARNINGS}",
            "make-tiny-model",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0
    assert not [name for name in result["during"] if name.startswith(HIDDEN)], done.stderr
    assert result["after"] == list(AFTER)


def test_the_warning_filters_name_their_source_not_their_wording():
    """The lazy-import filter drops records only while diffusers' code is on the stack; the import-time
    silence leaves every level as it was."""
    import logging

    from edtools.errors import (
        _IMPORT_PROBE_LOGGERS,
        _LAZY_IMPORT_LOGGER,
        _WhileImportedBy,
        quiet_harmless_warnings,
    )

    quiet_harmless_warnings()
    assert all(logging.getLogger(name).level == logging.NOTSET for name in _IMPORT_PROBE_LOGGERS)
    only_diffusers = _WhileImportedBy("diffusers")
    record = logging.LogRecord(_LAZY_IMPORT_LOGGER, logging.WARNING, __file__, 1, "any text", None, None)
    assert only_diffusers.filter(record)  # logged from here (tests), not from diffusers: kept
    diffusers_module = {"__name__": "diffusers.pipelines.pipeline_utils", "check": only_diffusers.filter}
    exec("def log_from_diffusers(record):\n    return check(record)", diffusers_module)
    assert not diffusers_module["log_from_diffusers"](record)
    assert any(isinstance(f, _WhileImportedBy) for f in logging.getLogger(_LAZY_IMPORT_LOGGER).filters)


def test_train_refuses_resume_without_checkpoint(tree, tmp_path, capsys):
    root = tree({"a": 2})
    args = [
        "train",
        "--data-root",
        str(root),
        "--model",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "run"),
    ]
    assert main([*args, "--resume"]) == 2
    assert capsys.readouterr().err.strip()
    assert main([*args, "--epochs", "0"]) == 2  # a bad value is a message and exit code 2, not a traceback
    assert "epochs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Single files: convert, train from one, save them; model errors are messages


def test_convert_between_folder_and_single_file_both_ways(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from edtools.models import load_components, make_tiny_model, read_state_dict

    folder = make_tiny_model(tmp_path / "tiny", "sdxl")
    single = tmp_path / "exported" / "tiny.safetensors"
    assert main(["convert", str(folder), str(single)]) == 0
    assert "SDXL single file (fp16)" in capsys.readouterr().out
    tensors, metadata = read_state_dict(single)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert main(["convert", str(single), str(tmp_path / "back"), "--config", str(folder)]) == 0
    original, back = load_components(str(folder)), load_components(str(tmp_path / "back"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for key, value in getattr(original, name).state_dict().items():
            expected = value.half().float() if value.is_floating_point() else value
            assert torch.equal(getattr(back, name).state_dict()[key], expected), f"{name}.{key}"
    assert main(["convert", str(folder), str(tmp_path / "full.safetensors"), "--dtype", "fp32"]) == 0
    full, _ = read_state_dict(tmp_path / "full.safetensors")
    assert {t.dtype for t in full.values() if t.is_floating_point()} == {torch.float32}


def test_model_problems_are_one_message_and_exit_code_2(tmp_path, tree, capsys):
    pytest.importorskip("torch")
    from edtools.models import make_tiny_model

    folder = make_tiny_model(tmp_path / "tiny")
    assert main(["convert", str(folder), str(tmp_path / "model.ckpt")]) == 2
    assert "writes single files as .safetensors only" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "Traceback" not in err
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    args = ["train", "--data-root", str(tree({"a": 2})), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*args, "--model", str(tmp_path / "broken.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.safetensors" in err and "Traceback" not in err
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "model_index.json").write_text("{")
    assert main([*args, "--model", str(tmp_path / "damaged")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_train_from_a_single_file_and_save_single_files(tmp_path, tree, capsys):
    torch = pytest.importorskip("torch")
    from edtools.models import load_components, load_single_file, make_tiny_model

    folder = make_tiny_model(tmp_path / "tiny")
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(folder), str(single), "--dtype", "fp32"]) == 0
    out = tmp_path / "run"
    args = [
        "train",
        "--data-root",
        str(tree({"a": 2})),
        "--model",
        str(single),
        "--model-config",
        str(folder),
    ]
    args += ["--out", str(out), "--epochs", "1", "--batch-size", "2", "--resolution", "64", "--lr", "1e-3"]
    assert main([*args, "--device", "cpu", "--save-single-file", "--no-progress-bar"]) == 0
    (checkpoint,) = sorted((out / "checkpoints").glob("step-*[0-9]"))
    beside = checkpoint.with_name(checkpoint.name + ".safetensors")
    trained, exported = load_components(str(checkpoint)), load_single_file(beside, model_config=str(folder))
    weight = trained.unet.conv_in.weight
    assert torch.equal(exported.unet.conv_in.weight, weight.half().float())
    assert not torch.equal(weight, load_components(str(folder)).unet.conv_in.weight)
