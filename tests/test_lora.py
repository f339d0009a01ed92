"""LoRA adapters: diffusers loads our kohya files to the same outputs, key names A1111/ComfyUI map, exact resume.

CPU only, tiny randomly initialised models built in code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("safetensors")

from edtools.errors import ModelError  # noqa: E402
from edtools.models import load_components, make_pipeline, make_tiny_model, tiny_components  # noqa: E402
from edtools.models.lora import (  # noqa: E402
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    base_model_version,
    has_lora,
    kohya_state_dict,
    load_lora_state_dict,
    lora_disabled,
    lora_parameters,
    lora_state_dict,
    read_lora_file,
    remove_lora,
    save_lora_file,
)

KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# The UNet transformer-block weights ComfyUI's comfy/utils.py unet_to_diffusers maps (UNET_MAP_ATTENTIONS and
# TRANSFORMER_BLOCKS); ComfyUI accepts "lora_unet_" + <diffusers key without .weight, "." -> "_"> for each.
COMFYUI_ATTENTION_WEIGHTS = {"proj_in", "proj_out"}
COMFYUI_TRANSFORMER_BLOCK_WEIGHTS = {
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
} | {"ff.net.0.proj", "ff.net.2"}
# ComfyUI's comfy/lora.py LORA_CLIP_MAP: the text encoder layers it maps from lora_te*_text_model_encoder_layers_N_*
COMFYUI_CLIP_SUFFIXES = {"mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj"}
COMFYUI_CLIP_SUFFIXES |= {"self_attn_out_proj"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-models")
    return {arch: make_tiny_model(root / arch, arch) for arch in PIPELINES}


def randomize(components, seed: int = 1) -> None:
    """Nonzero values for every LoRA weight (peft starts B at zero), exactly representable in fp16 so the
    default fp16 file holds exactly the weights our modules use."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora_parameters(components):
            parameter.copy_((torch.randn(parameter.shape, generator=generator) * 0.2).half().float())


def sample(pipeline) -> torch.Tensor:
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    return pipeline(
        "a photo of a red cat",
        num_inference_steps=2,
        height=128,
        width=128,
        latents=latents,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def prompt_embeds(pipeline) -> torch.Tensor:
    if isinstance(pipeline, diffusers.StableDiffusionXLPipeline):
        return pipeline.encode_prompt(
            "a photo of a red cat", device="cpu", do_classifier_free_guidance=False
        )[0]
    return pipeline.encode_prompt("a photo of a red cat", "cpu", 1, False)[0]


def base_state(components) -> dict[str, dict[str, torch.Tensor]]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {
        name: {k: v.detach().clone() for k, v in getattr(components, name).state_dict().items()}
        for name in names
        if getattr(components, name) is not None
    }


def module_names(module, prefix: str = "") -> dict[str, torch.nn.Module]:
    """Leaf Linear/Conv2d modules by their kohya-style underscored path."""
    return {
        prefix + name.replace(".", "_"): m
        for name, m in module.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


# ---------------------------------------------------------------------------------------------------------
# The file in diffusers: the same images as our adapted modules


@pytest.mark.parametrize("text_encoders", [False, True], ids=["unet", "unet+te"])
@pytest.mark.parametrize("arch", list(PIPELINES))
def test_diffusers_load_lora_weights_gives_our_adapted_output(folders, tmp_path, arch, text_encoders):
    components = load_components(str(folders[arch]))
    add_lora(components, rank=4, alpha=2.0, text_encoders=text_encoders, seed=0)
    randomize(components)
    lora_file = save_lora_file(components, tmp_path / "concept.safetensors")

    pipeline = getattr(diffusers, PIPELINES[arch]).from_pretrained(folders[arch])
    pipeline.set_progress_bar_config(disable=True)
    base, base_embeds = sample(pipeline), prompt_embeds(pipeline)
    pipeline.load_lora_weights(str(lora_file))
    theirs, their_embeds = sample(pipeline), prompt_embeds(pipeline)

    ours_pipeline = make_pipeline(components)
    ours, our_embeds = sample(ours_pipeline), prompt_embeds(ours_pipeline)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(their_embeds, our_embeds, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-2
    if text_encoders:
        assert (our_embeds - base_embeds).abs().max() > 1e-2
    else:
        torch.testing.assert_close(our_embeds, base_embeds, rtol=0, atol=0)
    with lora_disabled(components):  # our modules without the adapter are the base model
        torch.testing.assert_close(sample(ours_pipeline), base, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Key names, shapes, alpha, metadata


def a1111_sgm_name(name: str) -> str | None:
    """A1111's convert_diffusers_name_to_compvis for a UNet attention name: lora_unet_{down,mid,up}_blocks_*
    to the SGM/LDM UNet's input/middle/output blocks (3 blocks a level); None for other names."""
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", name):
        return f"lora_unet_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if m := re.fullmatch(r"lora_unet_mid_block_attentions_(\d+)_(.+)", name):
        return f"lora_unet_middle_block_1_{m[2]}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", name):
        return f"lora_unet_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    return None


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_kohya_file_names_shapes_alpha_and_metadata(tmp_path, arch):
    # SDXL on the real block layout (2 layers a level): the one A1111's SGM rule, used below, is written for
    real_blocks = arch == "sdxl"
    prediction_type = "v_prediction" if arch == "sd2" else "epsilon"
    components = tiny_components(arch, prediction_type=prediction_type, real_blocks=real_blocks)
    rank, alpha = 4, 3.0
    add_lora(components, rank=rank, alpha=alpha, text_encoders=True)
    randomize(components)
    extra = {"edtools_steps": "120", "ss_sd_model_name": "/models/base", "edtools_concepts": json.dumps([1])}
    path = save_lora_file(components, tmp_path / "out" / "style.safetensors", metadata=extra)
    tensors, metadata = read_lora_file(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["style.safetensors"]

    bad = [key for key in tensors if not KOHYA_KEY.match(key)]
    assert not bad, bad[:5]
    names = {key.split(".")[0] for key in tensors}
    for name in names:
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= tensors.keys(), name
    assert len(tensors) == 3 * len(names)
    prefixes = {re.match(r"lora_(unet|te1|te2|te)_", name)[1] for name in names}
    assert prefixes == ({"unet", "te1", "te2"} if arch == "sdxl" else {"unet", "te"})

    # Every name is a module of the (unadapted) model: UNet "lora_unet_" + its diffusers path with "_" for "."
    # (SDXL: its SGM path, as kohya's SDXL scripts write it, here derived with A1111's rule), text encoders
    # "lora_te*_text_model_" + their CLIP path (as kohya writes it under any transformers).
    pristine = tiny_components(arch, real_blocks=real_blocks)
    modules = module_names(pristine.unet, "lora_unet_")
    if arch == "sdxl":
        modules = {a1111_sgm_name(name): module for name, module in modules.items() if a1111_sgm_name(name)}
    te_prefixes = (
        {"te1": "text_encoder", "te2": "text_encoder_2"} if arch == "sdxl" else {"te": "text_encoder"}
    )
    for short, attr in te_prefixes.items():
        for key, module in module_names(getattr(pristine, attr)).items():
            key = key if key.startswith("text_model_") else "text_model_" + key
            modules[f"lora_{short}_{key}"] = module
    for name in names:
        assert name in modules, f"{name} names no module of the model"
        module = modules[name]
        down, up, a = (tensors[f"{name}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.dtype == up.dtype == torch.float16  # the default
        assert a.dtype == torch.float32 and a.ndim == 0 and a.item() == alpha
        if isinstance(module, torch.nn.Conv2d):  # SD 1.x proj_in/proj_out: 1x1 convs, written 4-d like kohya
            assert module.kernel_size == (1, 1)
            size_in, size_out, kernel = module.in_channels, module.out_channels, (1, 1)
        else:
            size_in, size_out, kernel = module.in_features, module.out_features, ()
        assert down.shape == (rank, size_in, *kernel) and up.shape == (size_out, rank, *kernel)

    # Which UNet modules: kohya's default LoRA rule, every Linear and 1x1 Conv2d in a Transformer2DModel.
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    expected = set()
    for path, block in pristine.unet.named_modules():
        if type(block).__name__ == "Transformer2DModel":
            for child, m in block.named_modules():
                if isinstance(m, torch.nn.Linear) or (
                    isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
                ):
                    expected.add("lora_unet_" + f"{path}.{child}".replace(".", "_"))
    if arch == "sdxl":
        expected = {a1111_sgm_name(name) for name in expected}
    assert unet_names == expected and len(expected) > 0
    layers = components.text_encoder.config.num_hidden_layers
    first = "te1" if arch == "sdxl" else "te"
    assert f"lora_{first}_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert sum(n.startswith(f"lora_{first}_") for n in names) == layers * len(TEXT_ENCODER_TARGETS)

    # ComfyUI: UNet names are "lora_unet_" + a diffusers or SGM weight key it maps; text encoders its CLIP map's.
    in_blocks = {w.replace(".", "_") for w in COMFYUI_TRANSFORMER_BLOCK_WEIGHTS}
    targets = {t.replace(".", "_") for t in UNET_TARGETS}
    for name in unet_names:
        block = re.sub(
            r"^lora_unet_((down_blocks_\d+_|up_blocks_\d+_|mid_block_)attentions_\d+"
            r"|(input|output)_blocks_\d+_1|middle_block_1)_",
            "",
            name,
        )
        inner = re.sub(r"^transformer_blocks_\d+_", "", block)
        assert block in COMFYUI_ATTENTION_WEIGHTS or (block != inner and inner in in_blocks), name
        assert inner in targets, name
    for name in names - unet_names:
        assert re.sub(r"^lora_te[12]?_text_model_encoder_layers_\d+_", "", name) in COMFYUI_CLIP_SUFFIXES, (
            name
        )

    version = {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[arch]
    architecture = {
        "sd1": "stable-diffusion-v1/lora",
        "sd2": "stable-diffusion-v2-768-v/lora",
        "sdxl": "stable-diffusion-xl-v1-base/lora",
    }[arch]
    assert base_model_version(components) == version
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "3.0"
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == str(arch == "sd2")
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.title"] == "style" and metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert {k: metadata[k] for k in extra} == extra
    assert all(isinstance(v, str) for v in metadata.values())


def test_sdxl_file_with_sgm_unet_names_loads_in_diffusers_as_our_adapter():
    """An SDXL file names the UNet's input/middle/output blocks as kohya's SDXL scripts do; diffusers loads
    it with its own block mapping: the result must equal our adapter, on the real block layout."""

    ours = tiny_components("sdxl", real_blocks=True)  # the real block layout: 2 layers a block, 3 levels
    plain = tiny_components("sdxl", real_blocks=True)
    add_lora(ours, rank=2, alpha=1.0)
    randomize(ours)
    state = kohya_state_dict(ours, dtype="fp32")
    unet_blocks = {re.match(r"lora_unet_([a-z]+_block)", k)[1] for k in state if k.startswith("lora_unet_")}
    assert unet_blocks == {"input_block", "middle_block", "output_block"}
    assert any("output_blocks_2_1" in k for k in state) and any("middle_block_1" in k for k in state)
    pipeline = make_pipeline(plain)
    pipeline.load_lora_weights(state)

    generator = torch.Generator().manual_seed(3)
    x = torch.randn((1, 4, 16, 16), generator=generator)
    context = torch.randn((1, 7, 96), generator=generator)
    extra = {"text_embeds": torch.randn((1, 32), generator=generator), "time_ids": torch.randn((1, 6))}
    with torch.no_grad():
        expected = ours.unet(x, 500, encoder_hidden_states=context, added_cond_kwargs=extra).sample
        loaded = pipeline.unet(x, 500, encoder_hidden_states=context, added_cond_kwargs=extra).sample
        with lora_disabled(ours):
            base = ours.unet(x, 500, encoder_hidden_states=context, added_cond_kwargs=extra).sample
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Checkpoint state, initialisation, settings


def test_lora_state_dict_round_trip_is_exact_and_mismatches_are_refused():
    source = tiny_components("sdxl")
    add_lora(source, rank=4, text_encoders=True, seed=0)
    randomize(source, seed=5)
    with torch.no_grad():
        for parameter in lora_parameters(source):  # not fp16-representable: the round trip keeps fp32
            parameter.add_(1e-4 / 3)
    state = lora_state_dict(source)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(".text_model.encoder.layers." in k for k in state if k.startswith("text_encoder"))
    for value, parameter in zip(state.values(), lora_parameters(source), strict=True):  # the same order
        assert torch.equal(value, parameter)

    target = tiny_components("sdxl")
    add_lora(target, rank=4, text_encoders=True, seed=9)
    load_lora_state_dict(target, state)
    for a, b in zip(lora_parameters(source), lora_parameters(target), strict=True):
        assert torch.equal(a, b)
    assert list(lora_state_dict(target)) == list(state)

    other_rank = tiny_components("sdxl")
    add_lora(other_rank, rank=2, text_encoders=True)
    with pytest.raises(ModelError, match="rank"):
        load_lora_state_dict(other_rank, state)
    unet_only = tiny_components("sdxl")
    add_lora(unet_only, rank=4)
    with pytest.raises(ModelError, match="targets differ"):
        load_lora_state_dict(unet_only, state)


def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first, second, other = (tiny_components("sd1") for _ in range(3))
    after_building = torch.get_rng_state()  # tiny_components forks the RNG too
    a = add_lora(first, rank=3, text_encoders=True, seed=7)
    b = add_lora(second, rank=3, text_encoders=True, seed=7)
    c = add_lora(other, rank=3, text_encoders=True, seed=8)
    assert torch.equal(torch.get_rng_state(), after_building) and torch.equal(before, after_building)
    assert len(a) == len(b) == len(c) and len(a) % 2 == 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    downs = range(0, len(a), 2)
    assert all(a[i].abs().max() > 0 and not torch.equal(a[i], c[i]) for i in downs)
    assert all(torch.count_nonzero(a[i + 1]) == 0 for i in downs)  # up (B) starts at zero
    assert all(p.requires_grad for p in a)
    # documented order: UNet first, then the text encoder; down before up
    names = list(lora_state_dict(first))
    assert names[0].startswith("unet.") and names[-1].startswith("text_encoder.")
    assert names[0].endswith("lora_A.weight") and names[1].endswith("lora_B.weight")


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 4, "alpha": 0}, "alpha"),
        ({"rank": 4, "alpha": -1.0}, "alpha"),
        ({"rank": 4, "alpha": float("nan")}, "alpha"),
        ({"rank": 4, "dropout": 1.0}, "dropout"),
        ({"rank": 4, "dropout": -0.1}, "dropout"),
    ],
)
def test_bad_settings_raise_value_errors_naming_the_field(settings, field):
    components = tiny_components("sd1")
    with pytest.raises(ValueError, match=rf"^{field} "):
        add_lora(components, **settings)
    assert not has_lora(components)


def test_without_or_with_a_second_adapter_the_errors_say_what_to_do(tmp_path):
    components = tiny_components("sd1")
    for call in (lora_state_dict, kohya_state_dict, lambda c: save_lora_file(c, tmp_path / "x.safetensors")):
        with pytest.raises(ModelError, match="add_lora"):
            call(components)
    add_lora(components, rank=2)
    with pytest.raises(ModelError, match="remove_lora"):
        add_lora(components, rank=2)


# ---------------------------------------------------------------------------------------------------------
# The base model stays as loaded


def test_training_a_step_changes_only_the_adapter_and_remove_lora_gives_back_the_base_model():
    components = tiny_components("sd1")
    before = base_state(components)
    parameters = add_lora(components, rank=4, dropout=0.1, text_encoders=True, seed=0)
    trainable = [
        p for m in (components.unet, components.text_encoder, components.vae) for p in m.parameters()
    ]
    assert {id(p) for p in trainable if p.requires_grad} == {id(p) for p in parameters}
    start = [p.detach().clone() for p in parameters]

    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    components.unet.train()
    components.text_encoder.train()
    ids = components.tokenizer(["a photo of a dog"], padding="max_length", return_tensors="pt").input_ids
    context = components.text_encoder(ids)[0]
    latents = torch.randn((1, 4, 16, 16))
    loss = components.unet(latents, 10, encoder_hidden_states=context).sample.pow(2).mean()
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, s) for p, s in zip(parameters, start, strict=True))

    remove_lora(components)
    assert not has_lora(components) and lora_parameters(components) == []
    after = base_state(components)
    for name, weights in before.items():
        assert list(after[name]) == list(weights), name  # no peft base_layer/lora names left
        for key, value in weights.items():
            assert torch.equal(after[name][key], value), f"{name}.{key}"


def test_merging_the_adapter_gives_a_plain_model_with_the_adapted_output():
    components = tiny_components("sdxl")
    add_lora(components, rank=4, alpha=8.0, text_encoders=True)
    randomize(components)
    pipeline = make_pipeline(components)
    adapted = sample(pipeline)
    with lora_disabled(components):
        base = sample(pipeline)
    assert all(p.requires_grad for p in lora_parameters(components))  # restored after the block
    remove_lora(components, merge=True)
    assert not has_lora(components)
    merged = sample(make_pipeline(components))
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert (merged - base).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# The file: dtype, metadata checks, atomic writes, reading


def test_file_dtype_metadata_errors_and_atomic_replace(tmp_path, monkeypatch):
    components = tiny_components("sd1")
    add_lora(components, rank=2)
    randomize(components)
    path = tmp_path / "lora.safetensors"
    for dtype, expected in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        tensors, _ = read_lora_file(save_lora_file(components, path, dtype=dtype))
        assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {expected}
    with pytest.raises(ValueError, match="dtype"):
        save_lora_file(components, path, dtype="int8")
    with pytest.raises(ValueError, match="'steps' is int"):
        save_lora_file(components, path, metadata={"steps": 100})
    with pytest.raises(ValueError, match="ss_network_dim"):
        save_lora_file(components, path, metadata={"ss_network_dim": "64"})
    assert save_lora_file(components, path, metadata={"modelspec.title": "My style"}) == path.resolve()
    good = path.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not a private temp file's 0600
    assert read_lora_file(path)[1]["modelspec.title"] == "My style"

    real_fsync = os.fsync

    def broken(fd):  # the temp file is written, then the disk fails
        real_fsync(fd)
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lora_file(components, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]

    with pytest.raises(ModelError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="could not read"):
        read_lora_file(tmp_path / "junk.safetensors")
