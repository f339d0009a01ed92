"""Two CPU processes under `accelerate launch` (gloo DDP): each trains its shard, together every batch once.

Each rank's callback records what it trained; the test checks the world size, the coverage and the synced weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from conftest import train_config

from edtools.balance.schedule import build_epoch
from edtools.config import TrainConfig
from edtools.dataset.scan import load_dataset, scan
from edtools.models import load_components, make_tiny_model

WORKER = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path

    import edtools.train.loop as train_module
    from edtools.config import TrainConfig

    kept = {}
    prepare_modules = train_module.prepare_modules

    def keep_components(components, config, device):  # to hash this rank's weights after training
        kept["components"] = components
        return prepare_modules(components, config, device)

    train_module.prepare_modules = keep_components
    record = {"steps": [], "epochs": []}

    def on_event(event):
        record["rank"], record["world_size"] = event.rank, event.world_size
        if event.kind == "step":
            record["steps"].append({"epoch": event.epoch, "images": list(event.images), "loss": event.loss})
        elif event.kind == "epoch":
            record["epochs"].append(event.images_per_concept)

    result = train_module.train(TrainConfig.from_file(sys.argv[1]), on_event)
    digest = hashlib.sha256()
    for module in (kept["components"].unet, kept["components"].text_encoder):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    record["weights"] = digest.hexdigest()
    record["result"] = {
        "global_step": result.global_step,
        "checkpoint": result.checkpoint,
        "stop_reason": result.stop_reason,
    }
    Path(sys.argv[2], f"rank{record['rank']}.json").write_text(json.dumps(record))
    """
)


def weights_digest(components) -> str:
    digest = hashlib.sha256()
    for module in (components.unet, components.text_encoder):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(
    config: TrainConfig, tmp_path: Path, timeout: float = 300, before: str = ""
) -> list[dict]:
    """Train config in 2 gloo processes under `accelerate launch`; each rank's record (see WORKER). `before`:
    Python each rank runs first (a fault to inject)."""
    config_file = config.to_file(tmp_path / "run.json")
    worker = tmp_path / "worker.py"
    worker.write_text(before + WORKER)
    records = tmp_path / "records"
    records.mkdir()
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # with cpu=True in the Accelerator: real 2-rank gloo DDP (--cpu would run one process)
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        str(worker),
        str(config_file),
        str(records),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # its own process group: on a timeout the launcher and both ranks go, none is left waiting
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate()
        pytest.fail(f"the ranks did not finish in {timeout} s:\n{stderr[-3000:]}")
    assert launcher.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_cover_each_batch_once(tree, tmp_path):
    root = tree({"a": 5, "b": 3})
    (root / "b" / "multiply.txt").write_text("1.5")
    model = make_tiny_model(tmp_path / "model")
    config = train_config(root, model, tmp_path / "out")
    ranks = launch_two_ranks(config, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"])  # lockstep: a short rank trains a filler batch

    dataset = load_dataset(root)
    odd_epochs = 0
    for epoch in range(config.epochs):
        schedule = build_epoch(dataset, epoch=epoch, seed=config.seed, batch_size=2, resolution=64)
        scheduled = Counter(tuple(sorted(schedule.batch(b).tolist())) for b in range(schedule.n_batches))
        trained = Counter(
            tuple(sorted(step["images"]))
            for r in ranks
            for step in r["steps"]
            if step["epoch"] == epoch and step["images"]
        )
        assert trained == scheduled, f"epoch {epoch}"
        odd_epochs += schedule.n_batches % 2  # an odd count gives rank 1 a zero-weight filler batch
        counts = dict(zip(dataset.concept_paths, schedule.images_per_concept(dataset).tolist(), strict=True))
        assert ranks[0]["epochs"][epoch] == ranks[1]["epochs"][epoch] == counts
        # the logged loss is the mean over both ranks' images, so both ranks report the same value
        assert [s["loss"] for s in ranks[0]["steps"]] == [s["loss"] for s in ranks[1]["steps"]]

    assert odd_epochs > 0

    # Gradients were synced: both ranks end with the same weights, which are the checkpoint's, and moved.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["result"] == ranks[1]["result"]
    checkpoint = load_components(ranks[0]["result"]["checkpoint"])
    assert weights_digest(checkpoint) == ranks[0]["weights"]
    assert weights_digest(load_components(str(model))) != ranks[0]["weights"]


@pytest.mark.slow
def test_a_batch_whose_every_image_fails_to_decode_keeps_the_ranks_in_step(tree, tmp_path):
    """Batch size 1: the rank whose image fails to decode has an empty batch, yet the other rank's step
    all-reduces gradients; the empty rank joins with a zero-weight stand-in, so neither waits forever."""
    root = tree({"a": 3, "b": 2})
    scan(root)  # the manifest knows the image now: the scan does not read it again
    bad = root / "a" / "a_001.png"
    stat = bad.stat()
    bad.write_bytes(b"\0" * stat.st_size)  # damaged after the scan, same size and time
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    config = train_config(root, make_tiny_model(tmp_path / "model"), tmp_path / "out", epochs=1, batch_size=1)
    ranks = launch_two_ranks(config, tmp_path, timeout=150)  # a rank left waiting would hang until then
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 3  # 5 images, 1 per batch, 2 ranks
    trained = sorted(i for r in ranks for step in r["steps"] for i in step["images"])
    dataset = load_dataset(root)
    assert trained == [i for i in range(5) if dataset.paths[i] != "a/a_001.png"]
    assert "a/a_001.png" in (tmp_path / "out" / "skipped_images.txt").read_text()
    assert ranks[0]["weights"] == ranks[1]["weights"]


@pytest.mark.slow
def test_a_data_root_that_goes_away_stops_every_rank_at_the_same_batch(tree, tmp_path):
    """Rank 0 finds the data root gone, rank 1 may have loaded its batch just before: they sum their answers,
    so both stop after the same step with one checkpoint, and none waits forever for the other."""
    root = tree({"a": 4, "b": 4})
    fault = textwrap.dedent(
        f"""
        import os
        import edtools.train.loop as loop
        emit = loop.emit
        def faulty_emit(run, event):
            emit(run, event)
            if event.kind == "step" and event.global_step == 3 and run.runtime.main:
                os.rename({str(root)!r}, {str(root) + "-away"!r})
        loop.emit = faulty_emit
        """
    )
    config = train_config(root, make_tiny_model(tmp_path / "model"), tmp_path / "out", epochs=2, batch_size=1)
    ranks = launch_two_ranks(config, tmp_path, timeout=150, before=fault)
    assert ranks[0]["result"] == ranks[1]["result"]
    assert ranks[0]["result"]["stop_reason"] == "data_root_gone"
    assert ranks[0]["result"]["global_step"] == 3
    assert ranks[0]["result"]["checkpoint"].endswith("step-00000003")
    assert ranks[0]["weights"] == ranks[1]["weights"]
