"""Single-file checkpoints: written in the original layout that diffusers' own loader reads back bit-exactly,
loaded again (EMA, fp16, .ckpt, VAE attention variants), pickled code refused, other files named, offline.

Tiny models with the real block structure, on the CPU; the Hugging Face cache is a temp folder, no network.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
hub_constants = pytest.importorskip("huggingface_hub.constants")

from single_file_cases import OpensAFile, differing, fake_hub_snapshot, module_names  # noqa: E402

from edtools.errors import ModelError  # noqa: E402
from edtools.models import Keep, load_components, make_tiny_model  # noqa: E402
from edtools.models.single_file import detect_architecture, load_single_file, read_state_dict  # noqa: E402
from edtools.models.single_file_layout import original_state_dict, save_single_file  # noqa: E402

ARCHS = ("sd1", "sd2", "sdxl")
DEFAULT_REPO = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict]:
    """Per architecture: the tiny diffusers folder, its components and an fp32 single file of them.
    SD2 is v-prediction (like SD 2.x 768-v), the others epsilon."""
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for arch in ARCHS:
        prediction = "v_prediction" if arch == "sd2" else "epsilon"
        folder = make_tiny_model(root / arch, arch, real_blocks=True, prediction_type=prediction)
        components = load_components(str(folder))
        file = save_single_file(components, root / f"{arch}.safetensors", dtype="fp32")
        out[arch] = {"folder": folder, "components": components, "file": file}
    return out


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache for this test only (offline, as conftest sets)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def assert_same_components(a, b, arch: str) -> None:
    for name in module_names(arch):
        assert differing(getattr(a, name), getattr(b, name)) == [], name


def write(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_own_loader_reads_the_written_file_bit_exactly(models, arch):
    model = models[arch]
    cls = diffusers.StableDiffusionXLPipeline if arch == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_single_file(str(model["file"]), config=str(model["folder"]), local_files_only=True)
    assert_same_components(pipe, model["components"], arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_single_file_then_save_again_is_identical(models, arch, tmp_path):
    model = models[arch]
    loaded = load_single_file(model["file"], model_config=model["folder"])
    assert_same_components(loaded, model["components"], arch)
    assert loaded.architecture == ("sdxl" if arch == "sdxl" else "sd")
    assert loaded.prediction_type == ("v_prediction" if arch == "sd2" else "epsilon")
    assert loaded.tokenizer("a photo of a dog").input_ids[0] == loaded.tokenizer.bos_token_id
    again = save_single_file(loaded, tmp_path / "again.safetensors", dtype="fp32")
    assert differing(read_state_dict(again)[0], read_state_dict(model["file"])[0]) == []


def test_a_different_unet_structure_maps_from_its_config(tmp_path):
    """The small default tiny model (2 levels, 1 layer, attention only on the second level) round-trips too:
    the key map comes from the config, not from a fixed SD 1.5 table."""
    folder = make_tiny_model(tmp_path / "small", "sd1")
    components = load_components(str(folder))
    file = save_single_file(components, tmp_path / "small.safetensors", dtype="fp32")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True
    )
    assert_same_components(pipe, components, "sd1")
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in read_state_dict(file)[0]


def test_written_layout_is_the_original_one(models):
    sd1 = read_state_dict(models["sd1"]["file"])[0]
    for key in (
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # no attention on the lowest level: .1
        "model.diffusion_model.output_blocks.5.2.conv.weight",  # after the attention block: .2
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.time_embed.2.bias",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
    ):
        assert key in sd1, key
    assert sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    q = sd1["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.ndim == 4 and q.shape[2:] == (1, 1)  # VAE attention as 1x1 convs, as in the original files

    sd2 = read_state_dict(models["sd2"]["file"])[0]
    te = models["sd2"]["components"].text_encoder.config
    layers, width = te.num_hidden_layers, te.hidden_size
    prefix = "cond_stage_model.model."
    assert sd2[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    # the layer SD 2.x skips (diffusers keeps one layer fewer) and the projection, as real files have them
    last, kept = f"{prefix}transformer.resblocks.{layers}.", f"{prefix}transformer.resblocks.{layers - 1}."
    assert torch.equal(sd2[last + "mlp.c_fc.weight"], sd2[kept + "mlp.c_fc.weight"])
    assert torch.equal(sd2[prefix + "text_projection"], torch.eye(width))
    assert "v_pred" in sd2 and prefix + "logit_scale" in sd2

    sdxl = read_state_dict(models["sdxl"]["file"])[0]
    te2 = models["sdxl"]["components"].text_encoder_2
    assert torch.equal(sdxl["conditioner.embedders.1.model.text_projection"], te2.text_projection.weight.T)
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
    ):
        assert key in sdxl, key
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    assert utils.infer_diffusers_model_type(sdxl) == "xl_base"


def test_every_weight_maps_or_the_write_is_refused(tmp_path, models):
    components = load_components(str(models["sd1"]["folder"]))
    components.unet.conv_in.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(ModelError, match=r"conv_in\.lora_A.*merge"):
        original_state_dict(components)
    with pytest.raises(ModelError, match="no original key"):
        save_single_file(components, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Variants that must load


def add_ema(state: dict) -> dict:
    """Original-training files: EMA copies under model_ema.<name without dots> (here: weights + 1)."""
    out = dict(state)
    for key, value in state.items():
        if key.startswith("model.diffusion_model."):
            out["model_ema." + "".join(key.split(".")[1:])] = value + 1
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def vae_attention_linear(state: dict) -> dict:
    return {
        k: v[:, :, 0, 0] if ".mid.attn_1." in k and k.endswith("weight") and v.ndim == 4 else v
        for k, v in state.items()
    }


@pytest.mark.parametrize(
    "variant", ["ema", "fp16", "ckpt_state_dict", "vae_attention_linear", "old_clip_names"]
)
def test_variants_load(models, tmp_path, variant):
    model = models["sd1"]
    state = read_state_dict(model["file"])[0]
    expected = model["components"]
    if variant == "ema":
        file = write(add_ema(state), tmp_path / "ema.safetensors")
    elif variant == "fp16":
        file = save_single_file(expected, tmp_path / "half.safetensors")  # fp16 is the default
        assert read_state_dict(file)[0]["model.diffusion_model.out.2.weight"].dtype == torch.float16
        expected = load_components(str(model["folder"]))
        for name in module_names("sd1"):  # what fp16 storage keeps of the weights
            module = getattr(expected, name)
            module.load_state_dict({k: v.half().float() for k, v in module.state_dict().items()})
    elif variant == "ckpt_state_dict":
        file = tmp_path / "model.ckpt"
        torch.save({"state_dict": {"state_dict": state}, "global_step": 10, "epoch": 1, "note": "x"}, file)
    elif variant == "old_clip_names":  # cond_stage_model.transformer.encoder... (no text_model. level)
        state = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
        file = write(state, tmp_path / "old.safetensors")
    else:
        file = write(vae_attention_linear(state), tmp_path / "linear.safetensors")
        assert read_state_dict(file)[0]["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 2
    loaded = load_single_file(file, model_config=model["folder"])
    assert loaded.unet.conv_in.weight.dtype == torch.float32
    assert_same_components(loaded, expected, "sd1")


def test_file_weights_the_configs_do_not_use_are_reported(models, tmp_path, caplog):
    state = {**sd1_state(models), "model.diffusion_model.extra_block.weight": torch.zeros(3)}
    file = write(state, tmp_path / "extra.safetensors")
    with caplog.at_level(logging.WARNING, logger="edtools.models"):
        load_single_file(file, model_config=models["sd1"]["folder"])
    assert "1 weights in the file are not used" in caplog.text and "extra_block" in caplog.text


@pytest.mark.parametrize(
    "key",
    ["model.diffusion_model.out.2.bias", "cond_stage_model.transformer.text_model.final_layer_norm.bias"],
)
def test_a_file_lacking_a_weight_the_configs_describe_is_refused(models, tmp_path, key):
    state = sd1_state(models)
    del state[key]
    file = write(state, tmp_path / "less.safetensors")
    with pytest.raises(ModelError, match=r"less\.safetensors lacks weights"):
        load_single_file(file, model_config=models["sd1"]["folder"])


def test_dtype_argument(models):
    loaded = load_single_file(
        models["sd1"]["file"], model_config=models["sd1"]["folder"], keep=Keep(torch.bfloat16)
    )
    for name in module_names("sd1"):
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.bfloat16}, name


# ---------------------------------------------------------------------------------------------------------
# Files that must be refused


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "code-ran"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": OpensAFile(marker)}
    file = tmp_path / "evil.ckpt"
    if container == "torch.save":
        torch.save(payload, file)
    else:
        file.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ModelError, match=r"evil\.ckpt contains Python code.*will not.*\.safetensors"):
        read_state_dict(file)
    with pytest.raises(ModelError, match="Python code"):
        load_single_file(file, model_config=tmp_path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(OpensAFile(tmp_path / "control")))  # the gadget itself is live
    assert (tmp_path / "control").exists()


def test_unreadable_files_name_the_file(tmp_path, models):
    good = models["sd1"]["file"].read_bytes()
    cases = {
        "missing.safetensors": None,
        "empty.safetensors": b"",
        "truncated.safetensors": good[: len(good) // 2],
        "garbage.ckpt": b"this is not a checkpoint at all",
        "truncated.ckpt": None,
    }
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, tmp_path / "whole.ckpt")
    cases["truncated.ckpt"] = (tmp_path / "whole.ckpt").read_bytes()[:300]
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError, match=re.escape(name) + ".*(does not exist|empty|truncated)"):
            read_state_dict(tmp_path / name)
    with pytest.raises(ModelError, match="not a file"):
        read_state_dict(tmp_path)
    torch.save({"name": "x", "step": 3}, tmp_path / "no-tensors.pt")
    with pytest.raises(ModelError, match="no tensors"):
        read_state_dict(tmp_path / "no-tensors.pt")


def sd1_state(models) -> dict:
    return read_state_dict(models["sd1"]["file"])[0]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("lora", "LoRA"),
        ("vae", "VAE file"),
        ("refiner", "SDXL refiner"),
        ("inpainting", r"inpainting model \(9 UNet input channels\).*text-to-image"),
        ("sd3", "Stable Diffusion 3"),
        ("flux", "FLUX"),
        ("diffusers_unet", "diffusers-format UNet"),
        ("embedding", "textual-inversion"),
        ("unknown", "does not look like a Stable Diffusion checkpoint"),
        ("unet_only", "no text encoder"),
    ],
)
def test_other_files_are_named(models, case, message):
    t = torch.zeros(2, 2)
    state = sd1_state(models)
    cases = {
        "lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t, "lora_te_x.alpha": t},
        "vae": {k: v for k, v in state.items() if k.startswith("first_stage_model.")},
        "refiner": {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": t,
            "conditioner.embedders.0.model.text_projection": t,
        },
        "inpainting": {**state, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)},
        # SD3 in the original layout loads (test_sd3_single_file); bare joint_blocks.* is another layout
        "sd3": {"joint_blocks.0.context_block.adaLN_modulation.1.bias": t, "x.y": t},
        "flux": {"double_blocks.0.img_attn.norm.key_norm.scale": t, "img_in.weight": t},
        "diffusers_unet": {"conv_in.weight": t, "down_blocks.0.resnets.0.conv1.weight": t},
        "embedding": {"emb_params": t},
        "unknown": {f"block{i}.weight": t for i in range(6)},
        "unet_only": {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")},
    }
    with pytest.raises(ModelError, match=message) as error:
        detect_architecture(cases[case], source="some/file.safetensors")
    assert "some/file.safetensors" in str(error.value)
    assert "edtools loads single-file" in str(error.value) or case == "unet_only"


def test_detection_by_key_layout(models):
    for arch in ARCHS:
        assert detect_architecture(read_state_dict(models[arch]["file"])[0]) == arch


def test_a_lora_file_is_refused_by_name_when_loading(tmp_path):
    file = write({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "style.safetensors")
    with pytest.raises(ModelError, match=r"style\.safetensors is a LoRA"):
        load_single_file(file)


def test_a_file_without_its_vae_is_refused(models, tmp_path):
    state = {k: v for k, v in sd1_state(models).items() if not k.startswith("first_stage_model.")}
    file = write(state, tmp_path / "novae.safetensors")
    with pytest.raises(ModelError, match=r"novae\.safetensors .* without VAE"):
        load_single_file(file, model_config=models["sd1"]["folder"])


@pytest.mark.parametrize(("file_arch", "config_arch"), [("sd1", "sdxl"), ("sdxl", "sd1"), ("sd1", "sd2")])
def test_a_config_of_another_architecture_is_refused(models, file_arch, config_arch):
    with pytest.raises(ModelError, match=r"model_config .* is an? .* but .* same architecture") as error:
        load_single_file(models[file_arch]["file"], model_config=models[config_arch]["folder"])
    assert models[file_arch]["file"].name in str(error.value)


def test_a_config_that_does_not_fit_is_wrapped(models, tmp_path):
    folder = make_tiny_model(tmp_path / "other", "sd1", real_blocks=False)  # same architecture, other sizes
    with pytest.raises(ModelError, match=r"could not load .*sd1\.safetensors.* configs of .*other"):
        load_single_file(models["sd1"]["file"], model_config=folder)


def test_model_config_that_is_neither_folder_nor_hub_id(models, tmp_path):
    with pytest.raises(ModelError, match="neither an existing folder nor a hub id"):
        load_single_file(models["sd1"]["file"], model_config=tmp_path / "no" / "such" / "folder")
    with pytest.raises(ModelError, match="lacks unet/config.json"):
        load_single_file(models["sd1"]["file"], model_config=tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Without model_config: diffusers' default repo for the file, from the cache only when offline


@pytest.mark.parametrize("arch", ARCHS)
def test_offline_without_cached_configs_says_what_to_pass(models, hub_cache, arch):
    with pytest.raises(ModelError, match=rf"--model-config {DEFAULT_REPO[arch]}.*local") as error:
        load_single_file(models[arch]["file"])
    assert models[arch]["file"].name in str(error.value) and "offline" in str(error.value)
    with pytest.raises(ModelError, match=rf"model_config {DEFAULT_REPO[arch]}.*network"):
        load_single_file(models[arch]["file"], model_config=DEFAULT_REPO[arch])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_cached_configs_of_the_inferred_repo_load_without_model_config(models, hub_cache, arch):
    fake_hub_snapshot(hub_cache, DEFAULT_REPO[arch], models[arch]["folder"])
    loaded = load_single_file(models[arch]["file"])
    assert_same_components(loaded, models[arch]["components"], arch)
    explicit = load_single_file(models[arch]["file"], model_config=DEFAULT_REPO[arch], local_files_only=True)
    assert_same_components(explicit, models[arch]["components"], arch)


# ---------------------------------------------------------------------------------------------------------
# Prediction type


@pytest.fixture
def epsilon_sd2(models, hub_cache, tmp_path) -> tuple[dict, Path]:
    """The SD2 file's tensors without its v_pred marker; an epsilon SD2 config cached as the default repo."""
    folder = make_tiny_model(tmp_path / "sd2-eps", "sd2", real_blocks=True, prediction_type="epsilon")
    fake_hub_snapshot(hub_cache, DEFAULT_REPO["sd2"], folder)
    state = {k: v for k, v in read_state_dict(models["sd2"]["file"])[0].items() if k != "v_pred"}
    return state, folder


@pytest.mark.parametrize(
    ("metadata", "extra_key", "expected"),
    [
        ({}, None, "epsilon"),
        ({"modelspec.prediction_type": "v"}, None, "v_prediction"),
        ({"ss_v_parameterization": "True"}, None, "v_prediction"),
        ({}, "v_pred", "v_prediction"),
    ],
)
def test_prediction_type_from_the_file(epsilon_sd2, tmp_path, caplog, metadata, extra_key, expected):
    state, _ = epsilon_sd2
    if extra_key:
        state = {**state, extra_key: torch.tensor([])}
    file = write(state, tmp_path / "m.safetensors", metadata)
    with caplog.at_level(logging.INFO, logger="edtools.models"):
        assert load_single_file(file).prediction_type == expected
    assert "prediction type" in caplog.text


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ('model:\n  target: x\n  params:\n    parameterization: "v"\n', "v_prediction"),
        ("model:\n  params:\n    linear_start: 0.00085\n", "epsilon"),
        ("model: [unclosed\n", "epsilon"),  # broken: ignored, the config decides
    ],
)
def test_prediction_type_from_a_yaml_beside_the_file(epsilon_sd2, tmp_path, yaml_text, expected):
    file = write(epsilon_sd2[0], tmp_path / "model.safetensors")
    (tmp_path / "model.yaml").write_text(yaml_text)
    assert load_single_file(file).prediction_type == expected


def test_zero_terminal_snr_marker_is_written_and_read(epsilon_sd2, models, tmp_path):
    """ComfyUI's v_pred / ztsnr keys (NoobAI-style v-prediction with zero terminal SNR) both ways."""
    components = load_components(str(models["sd2"]["folder"]))
    components.noise_scheduler = diffusers.DDPMScheduler.from_config(
        {**components.noise_scheduler.config, "rescale_betas_zero_snr": True}
    )
    written = original_state_dict(components)
    assert written["v_pred"].numel() == 0 and written["ztsnr"].numel() == 0
    file = write(
        {**epsilon_sd2[0], "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, tmp_path / "z.safetensors"
    )
    loaded = load_single_file(file)
    assert loaded.prediction_type == "v_prediction" and loaded.noise_scheduler.config.rescale_betas_zero_snr


def test_an_explicit_model_config_wins_over_the_file(epsilon_sd2, tmp_path):
    state, folder = epsilon_sd2
    file = write(state, tmp_path / "m.safetensors", {"modelspec.prediction_type": "v"})
    assert load_single_file(file, model_config=folder).prediction_type == "epsilon"


# ---------------------------------------------------------------------------------------------------------
# Writing: metadata, dtype, atomic


def test_metadata_is_written_and_readable(models, tmp_path):
    concepts = json.dumps([{"folder": "people/a", "images": 5, "multiply": 2.0}])
    extra = {"edtools.steps": "120", "edtools.base_model": "sd.safetensors", "edtools.concepts": concepts}
    file = save_single_file(models["sd2"]["components"], tmp_path / "out.safetensors", metadata=extra)
    tensors, metadata = read_state_dict(file)
    assert {k: metadata[k] for k in extra} == extra
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["modelspec.prediction_type"] == "v"
    assert metadata["modelspec.title"] == "out" and len(metadata["modelspec.date"]) == 10
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    sdxl = save_single_file(models["sdxl"]["components"], tmp_path / "xl.safetensors", dtype="bf16")
    xl_tensors, xl_metadata = read_state_dict(sdxl)
    assert xl_metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert {t.dtype for t in xl_tensors.values() if t.is_floating_point()} == {torch.bfloat16}


def test_bad_arguments_are_refused(models, tmp_path):
    components = models["sd1"]["components"]
    with pytest.raises(TypeError, match="edtools.steps.*int"):
        save_single_file(components, tmp_path / "a.safetensors", metadata={"edtools.steps": 10})
    with pytest.raises(ValueError, match="fp16, bf16, fp32"):
        save_single_file(components, tmp_path / "a.safetensors", dtype="fp8")
    with pytest.raises(ModelError, match=r"\.safetensors"):
        save_single_file(components, tmp_path / "a.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(models, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous checkpoint")

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(models["sd1"]["components"], target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert target.read_bytes() == b"previous checkpoint"
