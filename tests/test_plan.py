"""Loading each part as it is kept (never through a float32 copy), and the dry run: everything before the first
step, a plan that matches what the run does, the host memory measured, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import train_config  # noqa: E402

from edtools.balance.schedule import build_epoch, make_buckets  # noqa: E402
from edtools.cli import main  # noqa: E402
from edtools.models import Keep, load_components, make_tiny_model, save_single_file  # noqa: E402
from edtools.train.checkpoint import TrainState  # noqa: E402
from edtools.train.runtime import Runtime  # noqa: E402
from edtools.train.setup import kept_as, load_data, planned_steps  # noqa: E402

CPU = Runtime(torch.device("cpu"), 0, 1, None)


def dtypes(components) -> dict[str, torch.dtype]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    found = {}
    for name in names:
        module = getattr(components, name)
        if module is not None:
            kinds = {p.dtype for p in module.parameters()}
            assert len(kinds) == 1, (name, kinds)
            found[name] = kinds.pop()
    return found


@pytest.mark.parametrize(
    "values, float32",
    [
        (dict(lora_rank=4, train_text_encoder=True), set()),  # LoRA: every base part frozen
        (dict(lora_rank=0, train_text_encoder=False), {"unet"}),
        (dict(lora_rank=0, train_text_encoder=True), {"unet", "text_encoder", "text_encoder_2"}),
        (dict(lora_rank=0, train_text_encoder=True, train_text_encoder_2=False), {"unet", "text_encoder"}),
    ],
)
def test_each_part_is_kept_in_float32_only_when_it_trains_fully(tmp_path, values, float32):
    config = train_config(tmp_path, tmp_path, tmp_path / "out", mixed_precision="fp16", **values)
    keep = kept_as(config, CPU)
    assert keep == Keep(dtype=torch.float16, float32=frozenset(float32), device=CPU.device)


def test_without_mixed_precision_everything_is_float32(tmp_path):
    keep = kept_as(train_config(tmp_path, tmp_path, tmp_path / "out", lora_rank=4), CPU)
    assert keep.dtype is None and {keep.dtype_of(p) for p in ("unet", "vae")} == {torch.float32}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("sdxl") / "model", "sdxl", real_blocks=True)
    file = save_single_file(load_components(str(folder)), folder.parent / "model.safetensors", dtype="fp32")
    return folder, file


@pytest.mark.parametrize("source", ["folder", "file"])
def test_parts_load_in_the_dtype_they_are_kept_in(sdxl, source):
    """The UNet trains in float32, the text encoders are frozen in fp16, SDXL's VAE asks for float32; from a
    folder and from a single file alike, with the same values as loading in float32 and casting."""
    folder, file = sdxl
    model = str(folder if source == "folder" else file)
    config = {"model_config": str(folder)} if source == "file" else {}
    keep = Keep(dtype=torch.float16, float32=frozenset({"unet"}))
    kept = load_components(model, keep=keep, **config)
    assert dtypes(kept) == {
        "unet": torch.float32,
        "vae": torch.float32,  # force_upcast
        "text_encoder": torch.float16,
        "text_encoder_2": torch.float16,
    }
    full = load_components(model, **config)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        cast = {k: v.to(dtypes(kept)[name]) for k, v in getattr(full, name).state_dict().items()}
        assert all(torch.equal(cast[k], v) for k, v in getattr(kept, name).state_dict().items()), name


# A fresh process: load the model for a LoRA run (fp16 kept) or a full fine-tune (UNet in float32) and report
# the anonymous memory the load added, against the model's size in float32.
_MEASURE_LOAD = """
import dataclasses, gc, json, sys
import torch, diffusers, transformers
from edtools.config import TrainConfig
from edtools.train.host_memory import PeakHostMemory, current_host_memory
from edtools.train.runtime import Runtime
from edtools.train.setup import load_model
model, config_folder, lora_rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = TrainConfig(data_root=".", model=model, model_config=config_folder, out="out", device="cpu",
                     mixed_precision="fp16", lora_rank=lora_rank)
runtime = Runtime(torch.device("cpu"), 0, 1, None)
# once first as LoRA (nothing allocated): the modules a load imports are not the load's memory
load_model(dataclasses.replace(config, lora_rank=4), runtime)
gc.collect()
before = current_host_memory()
with PeakHostMemory() as peak:
    components = load_model(config, runtime)
unet_float32 = sum(p.numel() for p in components.unet.parameters()) * 4
print(json.dumps({"added": peak.result.anonymous - before.anonymous, "unet_float32": unet_float32}))
"""


@pytest.fixture(scope="module")
def bigger_sd_file(tmp_path_factory):
    """An SD1-shaped model whose UNet (~50 M parameters, 200 MB in float32) dwarfs the process's own noise,
    as an fp16 single file, the way people download them."""
    from edtools.models import tiny_components

    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("bigger")
    components = tiny_components("sd1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components.unet = diffusers.UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(96, 192, 384, 384),
            cross_attention_dim=components.text_encoder.config.hidden_size,
            attention_head_dim=8,
            layers_per_block=2,
        )
    from edtools.models import save_components

    config_folder = save_components(components, folder / "configs")
    return save_single_file(components, folder / "model.safetensors", dtype="fp16"), config_folder


def _measure_load(model, config_folder, lora_rank: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE_LOAD, str(model), str(config_folder), str(lora_rank)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_loading_for_lora_allocates_well_under_the_float32_model(bigger_sd_file):
    """fp16 kept from an fp16 file: no float32 copy, no copy at all (the file's pages are mapped). A full
    fine-tune's float32 UNet, measured the same way, shows the measure sees a real allocation."""
    file, config_folder = bigger_sd_file
    lora = _measure_load(file, config_folder, lora_rank=4)
    assert lora["unet_float32"] > 150e6
    assert lora["added"] < 0.25 * lora["unet_float32"], lora
    full = _measure_load(file, config_folder, lora_rank=0)
    assert full["added"] > 0.8 * full["unet_float32"], full


# ---------------------------------------------------------------------------------------------------------
# The dry run


def test_dry_run_prints_the_plan_of_the_run_and_writes_nothing(tree, tiny_model, tmp_path, capsys):
    root = tree({"a": 6, "b": 2, "preserve": 10})
    (root / "b" / "multiply.txt").write_text("3")
    (root / "preserve" / "multiply.txt").write_text("0.5")
    out = tmp_path / "run"
    args = [
        "train", "--dry-run", "--data-root", str(root), "--model", str(tiny_model), "--out", str(out),
        "--epochs", "3", "--batch-size", "2", "--resolution", "64", "--device", "cpu", "--lora-rank", "4",
        "--mixed-precision", "fp16", "--validation-split", "0.2",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    config = train_config(
        root, tiny_model, out, epochs=3, lora_rank=4, mixed_precision="fp16", validation_split=0.2
    )
    dataset, validation = load_data(config, True)
    buckets = make_buckets(64)
    steps = planned_steps(config, dataset, buckets, TrainState(), 1)
    assert f"plan: {steps} optimizer steps over 3 epochs" in printed
    first = build_epoch(dataset, epoch=0, seed=config.seed, batch_size=2, buckets=buckets)
    counts = np.bincount(dataset.concept_index[first.trained_images()], minlength=len(dataset.concepts))
    for concept, count in zip(dataset.concepts, counts, strict=True):
        line = next(line for line in printed.splitlines() if line.strip().startswith(concept.path + " "))
        assert line.split()[-1] == str(count) and f"{concept.n_images} images" in line
    assert f"{len(validation)} held out" in printed
    assert "unet" in printed and "float16" in printed  # the base UNet kept as loaded, fp16
    assert "host memory measured" in printed and "GiB anonymous" in printed


def test_dry_run_refuses_what_the_run_would_refuse(tree, tiny_model, tmp_path, capsys):
    root = tree({"a": 2})
    args = [
        "train",
        "--dry-run",
        "--data-root",
        str(root),
        "--model",
        str(tiny_model),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*args, "--resume", "--device", "cpu"]) == 2
    assert "holds no intact checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_dry_run_lists_every_part_of_a_transformer_family(tree, tmp_path, capsys):
    model = make_tiny_model(tmp_path / "sd3", "sd3")
    args = [
        "train", "--dry-run", "--data-root", str(tree({"a": 2})), "--model", str(model),
        "--out", str(tmp_path / "run"), "--resolution", "64", "--device", "cpu", "--lora-rank", "4",
    ]  # fmt: skip
    assert main(args) == 0
    listed = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:8]}
    components = load_components(str(model))
    # the denoiser under its family's name, and T5-XXL (SD3's third encoder) beside the CLIP ones
    assert set(listed) >= {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    t5 = sum(p.numel() for p in components.text_encoder_3.parameters())
    assert listed["text_encoder_3"][1:] == ["float32", f"{t5:,}", "parameters"]
