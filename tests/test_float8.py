"""Float8 weights: plain and ComfyUI's scaled (each stored weight times its scale_weight), dequantised at once
or a block at a time through memory-mapped scratch files, alike."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from edtools.errors import ModelError  # noqa: E402
from edtools.models.float8 import dequantise_scaled, dequantised, dequantised_on_disk  # noqa: E402

E4M3 = torch.float8_e4m3fn


def test_dequantised_keeps_t5s_wo_in_float32_in_fp16_and_copies_nothing_else():
    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(E4M3)
    norm = torch.ones(2, dtype=torch.float16)
    tensors = {
        "scaled_fp8": torch.empty(0, dtype=E4M3),
        "block.wo.weight": weight,
        "block.wo.scale_weight": torch.tensor(0.25),
        "block.wi.weight": weight,
        "block.wi.scale_weight": torch.tensor(2.0),
        "norm.weight": norm,
    }
    out = dequantised(tensors, torch.float16, keep_fp32=frozenset({"wo"}))
    assert sorted(out) == ["block.wi.weight", "block.wo.weight", "norm.weight"]
    assert out["block.wo.weight"].dtype == torch.float32 and out["block.wi.weight"].dtype == torch.float16
    assert out["block.wo.weight"].tolist() == [[0.25, -0.5], [0.125, 1.0]]
    assert out["block.wi.weight"].tolist() == [[2.0, -4.0], [1.0, 8.0]]
    assert out["norm.weight"] is norm
    del tensors["block.wi.scale_weight"]
    with pytest.raises(ModelError, match=r"block\.wi\.weight is scaled float8 .* no \.scale_weight"):
        dequantised(tensors, torch.float16)


def test_block_by_block_through_scratch_files_equals_at_once(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "scaled_fp8": torch.empty(0, dtype=E4M3),
        "shared.weight": torch.randn(3, 2, generator=generator),
    }
    for block in range(3):
        for name in ("q", "wo"):
            weight = torch.randn(4, 4, generator=generator)
            scale = weight.abs().max() / 448
            tensors[f"encoder.block.{block}.{name}.weight"] = (weight / scale).to(E4M3)
            tensors[f"encoder.block.{block}.{name}.scale_weight"] = scale.reshape(1)
    at_once = dequantised(tensors, torch.bfloat16, frozenset({"wo"}))
    on_disk = dequantised_on_disk(tensors, torch.bfloat16, frozenset({"wo"}), tmp_path)
    assert on_disk.keys() == at_once.keys()
    assert all(torch.equal(on_disk[k], at_once[k]) and on_disk[k].dtype == at_once[k].dtype for k in at_once)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # a file per block; unblocked weights stay


def test_a_files_scaled_weights_outside_the_part_are_refused():
    weight = torch.ones(2, 2).to(E4M3)
    state = {"first_stage_model.conv.weight": weight, "first_stage_model.conv.scale_weight": torch.ones(1)}
    with pytest.raises(
        ModelError, match=r"f\.safetensors holds scaled float8 weights outside its transformer"
    ):
        dequantise_scaled(
            dict(state), "model.diffusion_model.", torch.float16, "transformer", "f.safetensors"
        )
    # a T5's are read apart: left as they are
    t5 = {f"text_encoders.t5xxl.transformer.{k}": v for k, v in state.items()}
    kept = dict(t5)
    dequantise_scaled(
        kept, "model.diffusion_model.", torch.float16, "transformer", "f", "text_encoders.t5xxl."
    )
    assert kept.keys() == t5.keys()


def test_no_room_for_the_scratch_files_is_a_message(tmp_path):
    weight = torch.ones(2, 2).to(E4M3)
    full = tmp_path / "full"
    full.write_text("a file where the scratch folder should be")
    with pytest.raises(
        ModelError, match=r"cannot write the dequantised float8 weights' scratch files .*free disk .*TMPDIR"
    ):
        dequantised_on_disk({"encoder.block.0.q.weight": weight}, torch.float16, frozenset(), full)
