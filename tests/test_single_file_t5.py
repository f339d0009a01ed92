"""T5-XXL read from a single file (ComfyUI's SD3.5 checkpoints "incl_clips_t5xxl"): 16/32-bit, float8 and scaled
float8 weights, the config and tokenizer from a model_config that holds no T5 weights; t5 drop; 8-bit; a T5
that does not fit the config.

A tiny SD3 model (its T5 of T5-XXL's kind, smaller), on the CPU, no network.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from single_file_cases import differing  # noqa: E402

from edtools.errors import ModelError  # noqa: E402
from edtools.models import Keep, load_components, make_tiny_model  # noqa: E402
from edtools.models.float8 import dequantised  # noqa: E402
from edtools.models.single_file import load_single_file, read_state_dict  # noqa: E402
from edtools.models.single_file_layout import save_single_file  # noqa: E402

T5 = "text_encoders.t5xxl.transformer."
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> dict:
    """A tiny SD3 folder, its components, its single file (no T5, as edtools writes it) and a copy of the
    folder with T5's config and tokenizer but not its weights."""
    root = tmp_path_factory.mktemp("sd3-t5")
    folder = make_tiny_model(root / "model", "sd3")
    components = load_components(str(folder))
    file = save_single_file(components, root / "sd3.safetensors", dtype="fp32")
    configs = shutil.copytree(folder, root / "configs")
    weights = list((configs / "text_encoder_3").glob("*.safetensors"))
    assert weights
    for path in weights:
        path.unlink()
    return {"folder": folder, "components": components, "file": file, "configs": configs}


def t5_state(components, fmt: str = "fp32") -> dict[str, torch.Tensor]:
    """The T5's weights as a ComfyUI file holds them: `shared.weight` without its tied copy; "fp16", "fp32",
    "fp8" (float8 Linear weights, unscaled) or "scaled-fp8" (float8 with a scale per weight and the marker)."""
    state = {
        k: v.clone()
        for k, v in components.text_encoder_3.state_dict().items()
        if k != "encoder.embed_tokens.weight"
    }
    if fmt == "fp16":
        return {k: v.half() for k, v in state.items()}
    if fmt == "fp32":
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not (key.startswith("encoder.block.") and value.ndim == 2):
            out[key] = value.half()
        elif fmt == "fp8":
            out[key] = value.to(E4M3)
        else:
            scale = value.abs().max() / 448  # e4m3's largest finite value
            out[key] = (value / scale).to(E4M3)
            out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
            out[key.removesuffix(".weight") + ".scale_input"] = torch.ones(())
    if fmt == "scaled-fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return out


def with_t5(sd3, tmp_path: Path, t5: dict[str, torch.Tensor], name: str = "incl_t5") -> Path:
    state = read_state_dict(sd3["file"])[0]
    state.update({T5 + k: v for k, v in t5.items()})
    path = tmp_path / f"{name}.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def encode(encoder, tokenizer, text: str = "a red dog on a hill") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids).last_hidden_state.float()


@pytest.mark.parametrize("fmt", ["fp32", "fp16"])
def test_the_files_t5_is_read_with_only_configs_from_model_config(sd3, tmp_path, caplog, fmt):
    file = with_t5(sd3, tmp_path, t5_state(sd3["components"], fmt))
    keep = Keep(torch.float16) if fmt == "fp16" else Keep()
    with caplog.at_level(logging.INFO, logger="edtools.models"):  # a folder without T5's weights:
        loaded = load_single_file(file, model_config=sd3["configs"], keep=keep)
    assert "T5-XXL text encoder read from the file" in caplog.text
    # each weight as the file holds it, in the dtype it is kept in (transformers keeps T5's wo in float32)
    original = sd3["components"].text_encoder_3.state_dict()
    weights = loaded.text_encoder_3.state_dict()
    assert weights.keys() == original.keys()
    for key, value in weights.items():
        stored = original[key].half() if fmt == "fp16" else original[key]
        assert torch.equal(value, stored.to(value.dtype)), key
    wo = loaded.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32
    t5 = loaded.text_encoder_3
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()  # tied, as from a folder
    assert loaded.tokenizer_3("a dog").input_ids == sd3["components"].tokenizer_3("a dog").input_ids
    folder = load_components(str(sd3["folder"]), **({"dtype": torch.float16} if fmt == "fp16" else {}))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert differing(getattr(loaded, name), getattr(folder, name)) == [], name


def test_scaled_float8_weights_are_multiplied_by_their_scales(sd3, tmp_path):
    stored = t5_state(sd3["components"], "scaled-fp8")
    loaded = load_single_file(with_t5(sd3, tmp_path, stored), model_config=sd3["configs"])
    weights = loaded.text_encoder_3.state_dict()
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    scale = stored["encoder.block.0.layer.0.SelfAttention.q.scale_weight"]
    assert torch.equal(weights[key], stored[key].float() * scale)
    assert not any(k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8" for k in weights)
    # float8 keeps the encoder close to the original: its outputs within a few percent
    original = sd3["components"]
    ours = encode(loaded.text_encoder_3, loaded.tokenizer_3)
    theirs = encode(original.text_encoder_3, original.tokenizer_3)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.1
    # unscaled, each weight is its float8 value
    plain = t5_state(sd3["components"], "fp8")
    loaded = load_single_file(with_t5(sd3, tmp_path, plain, "fp8"), model_config=sd3["configs"])
    assert torch.equal(loaded.text_encoder_3.state_dict()[key], plain[key].float())


def test_t5_drop_leaves_the_files_t5_unread(sd3, tmp_path, caplog):
    file = with_t5(sd3, tmp_path, t5_state(sd3["components"], "fp16"))
    with caplog.at_level(logging.INFO, logger="edtools.models"):
        loaded = load_single_file(file, model_config=sd3["configs"], keep=Keep(t5="drop"))
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    assert "not loading the T5-XXL text encoder in the file (t5 drop)" in caplog.text


def test_a_t5_of_another_size_or_a_config_without_t5_is_refused(sd3, tmp_path):
    state = t5_state(sd3["components"])
    del state["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    state["encoder.block.9.layer.0.SelfAttention.q.weight"] = torch.zeros(4, 4)
    with pytest.raises(ModelError, match=r"T5-XXL in .* does not fit .*lacks 1 weights .*has unknown 1"):
        load_single_file(with_t5(sd3, tmp_path, state, "odd"), model_config=sd3["configs"])
    without = shutil.copytree(sd3["configs"], tmp_path / "no-t5")
    shutil.rmtree(without / "text_encoder_3")
    with pytest.raises(ModelError, match=r"holds a T5-XXL .* has no text_encoder_3 / tokenizer_3"):
        load_single_file(with_t5(sd3, tmp_path, t5_state(sd3["components"])), model_config=without)


@pytest.mark.slow
def test_an_8bit_t5_is_quantised_from_the_files_float8_weights(sd3, tmp_path, monkeypatch):
    """The real int8 load from the file (bitsandbytes runs LLM.int8 on the CPU; edtools' CUDA gate lifted)."""
    pytest.importorskip("bitsandbytes")
    from edtools.models import quantize

    monkeypatch.setattr(quantize, "cuda_present", lambda: True)
    file = with_t5(sd3, tmp_path, t5_state(sd3["components"], "scaled-fp8"))
    loaded = load_single_file(file, model_config=sd3["configs"], keep=Keep(torch.float16, t5="8bit"))
    linear = loaded.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q
    assert (type(linear).__name__, linear.weight.dtype) == ("Linear8bitLt", torch.int8)
    # dequantised block by block through scratch files, it is quantised as from the weights dequantised at once
    stored = t5_state(sd3["components"], "scaled-fp8")
    at_once = dequantised(stored, torch.float16, frozenset({"wo"}))
    reference = type(loaded.text_encoder_3).from_pretrained(
        None,
        config=type(loaded.text_encoder_3.config).from_pretrained(sd3["configs"] / "text_encoder_3"),
        state_dict=at_once,
        dtype=torch.float16,
        **quantize.t5_8bit_loading(None),
    )
    ours_state, theirs_state = loaded.text_encoder_3.state_dict(), reference.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert all(
        torch.equal(ours_state[k], theirs_state[k]) for k in ours_state if k != "encoder.embed_tokens.weight"
    )
    original = sd3["components"]
    ours = encode(loaded.text_encoder_3, loaded.tokenizer_3)
    theirs = encode(original.text_encoder_3, original.tokenizer_3)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.15
