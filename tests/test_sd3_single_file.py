"""SD3 / SD3.5 single files: written in Stability's layout that diffusers' own readers read back bit-exactly,
loaded whole or as the transformer alone (the rest from model_config), trained like the diffusers folder, and
the diffusers-format LoRA file's keys resolved the way ComfyUI resolves them.

Tiny models with SD3.5's block structure (a second attention, RMS q/k norm), on the CPU, no network.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from conftest import train_config  # noqa: E402
from single_file_cases import differing  # noqa: E402

from edtools.cli import main  # noqa: E402
from edtools.errors import ModelError  # noqa: E402
from edtools.models import Keep, load_components, make_tiny_model  # noqa: E402
from edtools.models.single_file import detect_architecture, load_single_file, read_state_dict  # noqa: E402
from edtools.models.single_file_layout import save_single_file  # noqa: E402

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# SD3.5's transformer (dual attention, q/k norm) came with diffusers 0.31; 0.30 reads SD3 Medium's
REAL_BLOCKS = "dual_attention_layers" in inspect.signature(diffusers.SD3Transformer2DModel).parameters


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> dict:
    """The tiny SD3 (SD3.5 blocks where this diffusers has them) folder, its components and an fp32 file."""
    root = tmp_path_factory.mktemp("sd3-single")
    folder = make_tiny_model(root / "model", "sd3", real_blocks=REAL_BLOCKS)
    components = load_components(str(folder))
    file = save_single_file(components, root / "sd3.safetensors", dtype="fp32")
    return {"folder": folder, "components": components, "file": file, "root": root}


def write(tensors: dict, path: Path) -> Path:
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def assert_same(a, b) -> None:
    for name in PARTS:
        assert differing(getattr(a, name), getattr(b, name)) == [], name


# ---------------------------------------------------------------------------------------------------------
# The layout, against diffusers' own readers


def test_diffusers_readers_read_the_written_file_bit_exactly(sd3):
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    transformers = pytest.importorskip("transformers")
    file, folder, components = str(sd3["file"]), str(sd3["folder"]), sd3["components"]
    transformer = diffusers.SD3Transformer2DModel.from_single_file(
        file, config=folder, subfolder="transformer", local_files_only=True
    )
    vae = diffusers.AutoencoderKL.from_single_file(
        file, config=folder, subfolder="vae", local_files_only=True
    )
    assert differing(transformer, components.unet) == [] and differing(vae, components.vae) == []
    state = read_state_dict(file)[0]
    for part, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        only = {k: v for k, v in state.items() if k.startswith(f"text_encoders.{prefix}.")}
        encoder = utils.create_diffusers_clip_model_from_ldm(
            transformers.CLIPTextModelWithProjection,
            only,
            subfolder=part,
            config=folder,
            local_files_only=True,
        )
        assert differing(encoder, getattr(components, part)) == [], part


def test_written_layout_is_stabilitys(sd3):
    state, metadata = read_state_dict(sd3["file"])
    unet = sd3["components"].unet
    width = unet.config.num_attention_heads * unet.config.attention_head_dim
    prefix = "model.diffusion_model."
    block = unet.transformer_blocks[0]
    qkv = torch.cat([block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight])
    assert torch.equal(state[prefix + "joint_blocks.0.x_block.attn.qkv.weight"], qkv)
    context = torch.cat([block.attn.add_q_proj.bias, block.attn.add_k_proj.bias, block.attn.add_v_proj.bias])
    assert torch.equal(state[prefix + "joint_blocks.0.context_block.attn.qkv.bias"], context)
    # diffusers keeps (scale, shift) where the original has (shift, scale): the last block's context norm and
    # the final layer's
    last = unet.config.num_layers - 1
    norm = unet.transformer_blocks[last].norm1_context.linear.weight
    written = state[prefix + f"joint_blocks.{last}.context_block.adaLN_modulation.1.weight"]
    assert torch.equal(written[:width], norm[width:]) and torch.equal(written[width:], norm[:width])
    final = state[prefix + "final_layer.adaLN_modulation.1.bias"]
    assert torch.equal(
        final, torch.cat([unet.norm_out.linear.bias[width:], unet.norm_out.linear.bias[:width]])
    )
    assert torch.equal(state[prefix + "pos_embed"], unet.pos_embed.pos_embed)
    if REAL_BLOCKS:
        for key in ("joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.0.x_block.attn.ln_q.weight"):
            assert prefix + key in state, key
        assert not any("joint_blocks.1.x_block.attn2" in k for k in state)
    assert "first_stage_model.encoder.conv_in.weight" in state
    assert "first_stage_model.quant_conv.weight" not in state  # SD3's VAE has none
    for name in ("clip_l", "clip_g"):
        assert f"text_encoders.{name}.transformer.text_model.final_layer_norm.weight" in state
        assert f"text_encoders.{name}.transformer.text_projection.weight" in state
    assert metadata["modelspec.architecture"] == "stable-diffusion-v3-medium"
    assert metadata["modelspec.prediction_type"] == "flow"
    assert detect_architecture(state) == "sd3"


# ---------------------------------------------------------------------------------------------------------
# Loading: whole files, files of the transformer (and VAE) alone


def test_load_single_file_then_save_again_is_identical(sd3, tmp_path):
    loaded = load_single_file(sd3["file"], model_config=sd3["folder"])
    assert_same(loaded, sd3["components"])
    assert loaded.architecture == "sd3" and loaded.prediction_type == "flow_matching"
    assert loaded.noise_scheduler.config.shift == sd3["components"].noise_scheduler.config.shift
    assert loaded.tokenizer_2("a dog").input_ids[0] == loaded.tokenizer_2.bos_token_id
    again = save_single_file(loaded, tmp_path / "again.safetensors", dtype="fp32")
    assert differing(read_state_dict(again)[0], read_state_dict(sd3["file"])[0]) == []


@pytest.mark.parametrize(
    "kept", [("model.diffusion_model.",), ("model.diffusion_model.", "first_stage_model.")]
)
def test_parts_the_file_lacks_come_from_model_config(sd3, tmp_path, caplog, kept):
    state = read_state_dict(sd3["file"])[0]
    file = write({k: v for k, v in state.items() if k.startswith(kept)}, tmp_path / "part.safetensors")
    with caplog.at_level(logging.INFO, logger="edtools.models"):
        loaded = load_single_file(file, model_config=sd3["folder"], keep=Keep(torch.bfloat16))
    assert "has no" in caplog.text and "CLIP-G text encoder" in caplog.text
    for name in PARTS:  # each part in the dtype it is kept in, wherever it came from
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.bfloat16}, name
    expected = load_components(str(sd3["folder"]), dtype=torch.bfloat16)
    assert_same(loaded, expected)


def test_a_file_lacking_parts_without_model_config_says_to_set_it(sd3, tmp_path):
    state = read_state_dict(sd3["file"])[0]
    file = write(
        {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}, tmp_path / "t.safetensors"
    )
    with pytest.raises(ModelError, match=r"t\.safetensors .* without VAE .*--model-config.*3\.5-medium"):
        load_single_file(file)


def float8_file(sd3, path: Path, scaled: bool) -> tuple[Path, dict]:
    """The file with the transformer's block Linear weights in float8 (e4m3): plain, or scaled as ComfyUI's
    fp8_scaled files (each stored weight times its scale_weight)."""
    out = {}
    for key, value in read_state_dict(sd3["file"])[0].items():
        if not (key.startswith("model.diffusion_model.joint_blocks.") and value.ndim == 2):
            out[key] = value
        elif scaled:
            scale = value.abs().max() / 448
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            out[key] = value.to(torch.float8_e4m3fn)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return write(out, path), out


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_a_float8_file_loads_each_weight_as_stored_times_its_scale(sd3, tmp_path, scaled):
    file, stored = float8_file(sd3, tmp_path / "sd3_fp8.safetensors", scaled=scaled)
    loaded = load_single_file(file, model_config=sd3["folder"], keep=Keep(torch.bfloat16))
    key = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    qkv = stored[key].float() * (stored[key.removesuffix(".weight") + ".scale_weight"] if scaled else 1)
    q = loaded.unet.transformer_blocks[0].attn.to_q.weight
    assert q.dtype == torch.bfloat16 and torch.equal(q, qkv[: q.shape[0]].to(torch.bfloat16))
    if scaled:  # scaled float8 keeps the transformer close to the file's 32-bit one
        reference = load_single_file(sd3["file"], model_config=sd3["folder"], keep=Keep(torch.bfloat16)).unet
        ours, theirs = loaded.unet.state_dict(), reference.state_dict()
        errors = [
            ((ours[k].float() - theirs[k].float()).norm() / theirs[k].float().norm()).item() for k in ours
        ]
        assert max(errors) < 0.1


def test_a_config_of_another_family_is_refused(sd3, tiny_model):
    with pytest.raises(ModelError, match="lacks transformer/config.json"):
        load_single_file(sd3["file"], model_config=tiny_model)


def test_convert_writes_and_reads_sd3_single_files(sd3, tmp_path, capsys):
    file = tmp_path / "c.safetensors"
    assert main(["convert", str(sd3["folder"]), str(file), "--dtype", "fp32"]) == 0
    assert "SD3 single file" in capsys.readouterr().out
    assert differing(read_state_dict(file)[0], read_state_dict(sd3["file"])[0]) == []
    back = tmp_path / "back"
    assert main(["convert", str(file), str(back), "--config", str(sd3["folder"])]) == 0
    assert_same(load_components(str(back)), sd3["components"])


# ---------------------------------------------------------------------------------------------------------
# The LoRA file in ComfyUI
#
# A port of the key matching ComfyUI applies to an SD3 model, for the diffusers form edtools writes:
# - comfy/lora.py model_lora_keys_unet: for an SD3 model, "transformer.<diffusers key without .weight>" -> the
#   weight mmdit_to_diffusers maps it to; model_lora_keys_clip: "text_encoder.text_model.encoder.layers.N.<m>"
#   -> clip_l's and "text_encoder_2...." -> clip_g's "...transformer.text_model.encoder.layers.N.<m>.weight"
#   for m in LORA_CLIP_MAP (self_attn q/k/v/out_proj, mlp.fc1/fc2).
# - comfy/utils.py mmdit_to_diffusers (MMDIT_MAP_BASIC, MMDIT_MAP_BLOCK; in its SD3.5 form with attn2 and
#   ln_q/ln_k): transformer_blocks.N.<module> -> diffusion_model.joint_blocks.N.<original>; to_q/to_k/to_v
#   (attn, attn2) and add_q/k/v_proj -> a third of the fused qkv, rows (offset * i, offset).
# - comfy/lora.py load_lora: "<key>.lora_B.weight" (up) and "<key>.lora_A.weight" (down); alpha None = scale 1.
# ComfyUI's offset is depth * 64, which is the hidden width of every SD3/3.5 release; the tiny model's width is
# not 64 per block, so the port takes the width itself.

_COMFY_BLOCK = {  # diffusers module -> original module inside joint_blocks.N (MMDIT_MAP_BLOCK, .weight rows)
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_add_out": "context_block.attn.proj",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
}
_COMFY_QKV = {
    "attn.to_": "x_block.attn.qkv",
    "attn.add_": "context_block.attn.qkv",
    "attn2.to_": "x_block.attn2.qkv",
}
_COMFY_CLIP = (
    "mlp.fc1",
    "mlp.fc2",
    "self_attn.k_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)


def comfy_sd3_lora_key_map(
    unet_config: dict, clip_layers: dict[str, int]
) -> dict[str, tuple[str, int | None]]:
    """LoRA key (without .lora_A/.lora_B.weight) -> (ComfyUI model weight, slice start or None)."""
    width = unet_config["num_attention_heads"] * unet_config["attention_head_dim"]
    key_map: dict[str, tuple[str, int | None]] = {}
    for i in range(unet_config["num_layers"]):
        block = f"diffusion_model.joint_blocks.{i}"
        for module, original in _COMFY_BLOCK.items():
            key_map[f"transformer.transformer_blocks.{i}.{module}"] = (f"{block}.{original}.weight", None)
        for lead, fused in _COMFY_QKV.items():
            names = ("q_proj", "k_proj", "v_proj") if lead == "attn.add_" else ("q", "k", "v")
            for slot, name in enumerate(names):
                key_map[f"transformer.transformer_blocks.{i}.{lead}{name}"] = (
                    f"{block}.{fused}.weight",
                    slot * width,
                )
    for lora_prefix, clip, layers in (
        ("text_encoder", "clip_l", clip_layers["clip_l"]),
        ("text_encoder_2", "clip_g", clip_layers["clip_g"]),
    ):
        for n in range(layers):
            for module in _COMFY_CLIP:
                weight = f"{clip}.transformer.text_model.encoder.layers.{n}.{module}.weight"
                key_map[f"{lora_prefix}.text_model.encoder.layers.{n}.{module}"] = (weight, None)
    return key_map


def comfy_model_state(single_file_state: dict) -> dict:
    """A checkpoint's weights as ComfyUI's SD3 model holds them (model.diffusion_model. -> diffusion_model.,
    text_encoders.<clip>. -> <clip>.)."""
    out = {}
    for key, value in single_file_state.items():
        if key.startswith("model.diffusion_model."):
            out[key.removeprefix("model.")] = value
        elif key.startswith("text_encoders."):
            out[key.removeprefix("text_encoders.")] = value
    return out


def test_every_lora_key_resolves_in_comfyui_to_a_weight_of_its_shape(sd3, tmp_path):
    from edtools.models.lora import add_lora, read_lora_file, save_lora_file

    components = load_components(str(sd3["folder"]))
    add_lora(components, rank=4, alpha=2, text_encoders=True)
    with torch.no_grad():  # a trained adapter: lora_B no longer zero
        for name, param in components.unet.named_parameters():
            if "lora_B" in name:
                param.normal_()
    lora, _ = read_lora_file(save_lora_file(components, tmp_path / "lora.safetensors", dtype="fp32"))
    model = comfy_model_state(read_state_dict(sd3["file"])[0])
    layers = {
        "clip_l": components.text_encoder.config.num_hidden_layers,
        "clip_g": components.text_encoder_2.config.num_hidden_layers,
    }
    key_map = comfy_sd3_lora_key_map(dict(components.unet.config), layers)
    width = components.unet.config.num_attention_heads * components.unet.config.attention_head_dim
    stems = {key.rsplit(".lora_", 1)[0] for key in lora}
    assert {key.rsplit(".", 2)[-2] for key in lora} == {"lora_A", "lora_B"}  # no other kind of key
    unresolved = sorted(stem for stem in stems if stem not in key_map)
    assert unresolved == [], f"ComfyUI would skip: {unresolved[:5]}"
    for stem in stems:
        up, down = lora[f"{stem}.lora_B.weight"], lora[f"{stem}.lora_A.weight"]
        weight, start = key_map[stem]
        assert weight in model, weight
        target = model[weight] if start is None else model[weight][start : start + width]
        assert (up @ down).shape == target.shape, stem
    assert any(".attn2." in stem for stem in stems) == REAL_BLOCKS
    assert {stem.split(".")[0] for stem in stems} == {"transformer", "text_encoder", "text_encoder_2"}


# ---------------------------------------------------------------------------------------------------------
# Training from the single file


@pytest.mark.slow
def test_lora_from_the_single_file_trains_like_the_folder(tree, sd3, tmp_path):
    """`edtools train --model file.safetensors --model-config <folder>` against the folder itself: the same
    loss at every step and the same adapter, at the same seed."""
    from edtools.train import train

    root = tree({"a": 2, "b": 2})
    settings = dict(epochs=2, lora_rank=4, lora_lr=1e-2, lora_text_encoder=True, train_text_encoder=False)
    runs = {}
    for name, model, extra in (
        ("folder", sd3["folder"], {}),
        ("file", sd3["file"], {"model_config": str(sd3["folder"])}),
    ):
        events = []
        result = train(train_config(root, model, tmp_path / name, **settings, **extra), events.append)
        state = torch.load(Path(result.checkpoint) / "resume" / "state.pt", weights_only=True)["lora"]
        runs[name] = ([e.loss for e in events if e.kind == "step"], state)
    (losses, state), (file_losses, file_state) = runs["folder"], runs["file"]
    assert len(losses) == len(file_losses) >= 4
    assert file_losses == pytest.approx(losses, rel=1e-5, abs=1e-7)
    assert state.keys() == file_state.keys()
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it trained
    for key in state:
        assert torch.allclose(state[key], file_state[key], atol=1e-6), key
