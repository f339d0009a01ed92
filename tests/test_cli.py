"""The command line on real data roots: scan, schedule, make-demo, exit codes and files written.

Runs main() in process, and `python -m edtools` once as a subprocess to check the entry point.
"""

from __future__ import annotations

import subprocess
import sys

from edtools.cli import main
from edtools.dataset import load_dataset
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
