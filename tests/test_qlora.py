"""QLoRA (quantize_base nf4): the frozen SD3 transformer loaded in 4-bit NF4 by diffusers and bitsandbytes, LoRA
trained on it; the refusals (no GPU, no LoRA, a UNet family) say what to do. (A Flux single file under nf4:
test_flux_single_file.)"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
from conftest import train_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edtools.config import ConfigError, TrainConfig  # noqa: E402
from edtools.errors import ModelError  # noqa: E402
from edtools.models import Keep, load_components, make_tiny_model  # noqa: E402
from edtools.models.families import FAMILIES  # noqa: E402
from edtools.train import train  # noqa: E402

REQUIRED = {"data_root": "data", "model": "model", "out": "out"}


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sd3q") / "model", "sd3")


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_quantize_base_is_validated_and_needs_lora():
    assert TrainConfig(**REQUIRED).quantize_base == "none"
    assert TrainConfig(**REQUIRED, lora_rank=8, quantize_base="nf4").quantize_base == "nf4"
    with pytest.raises(
        ConfigError, match=r"quantize_base is 'nf4'; a quantised base trains only LoRA .*lora_rank"
    ):
        TrainConfig(**REQUIRED, quantize_base="nf4")
    with pytest.raises(ConfigError, match=r"quantize_base.*'int3'.*none, nf4"):
        TrainConfig(**REQUIRED, lora_rank=8, quantize_base="int3")
    assert [f.name for f in FAMILIES if f.quantizable] == ["sd3", "flux"]  # transformer families only


def test_without_a_gpu_the_run_fails_before_loading(tree, sd3_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: QLoRA can run here")
    config = train_config(tree({"a": 2}), sd3_model, tmp_path / "out", lora_rank=4, quantize_base="nf4")
    if not hasattr(diffusers, "BitsAndBytesConfig"):  # Colab's pinned diffusers 0.30
        with pytest.raises(ModelError, match=r"quantize_base nf4 needs diffusers 0.31 or newer"):
            train(config)
        return
    with pytest.raises(ConfigError, match=r"quantize_base is 'nf4': QLoRA needs a CUDA GPU.*No GPU found"):
        train(config)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_unet_family_is_refused_from_a_folder_or_a_single_file(tiny_model, tmp_path):
    from edtools.models import save_single_file

    with pytest.raises(
        ModelError,
        match=r"is a Stable Diffusion model, whose unet edtools does not quantise; QLoRA is for the transformer families \(Stable Diffusion 3, Flux.1\)",
    ):
        load_components(str(tiny_model), keep=Keep(quantize="nf4"))
    single = save_single_file(load_components(str(tiny_model)), tmp_path / "model.safetensors")
    with pytest.raises(
        ModelError, match=r"is a Stable Diffusion model, whose unet edtools does not quantise"
    ):
        load_components(str(single), keep=Keep(quantize="nf4"))


def test_qlora_trains_on_a_real_nf4_transformer_and_its_file_loads_unquantised(
    tree, sd3_model, tmp_path, cpu_quantization
):
    import bitsandbytes as bnb

    from edtools.models.lora import read_lora_file

    # the real quantised load: every Linear of the transformer is bitsandbytes' Linear4bit holding NF4 weights
    components = load_components(str(sd3_model), keep=Keep(quantize="nf4"))
    linears = [m for m in components.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    weights = [m.weight for m in linears]
    assert all(isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8 for w in weights)
    assert {w.quant_state.quant_type for w in weights} == {"nf4"}
    plain = load_components(str(sd3_model))
    quantized_bytes = sum(w.numel() * w.element_size() for w in weights)
    plain_bytes = sum(m.weight.numel() * 4 for m in plain.unet.modules() if isinstance(m, torch.nn.Linear))
    assert quantized_bytes * 8 == plain_bytes  # 4 bits a weight against float32's 32
    del components, plain

    before = hashes(sd3_model)
    out = tmp_path / "out"
    config = train_config(
        tree({"a": 3, "b": 3}),
        sd3_model,
        out,
        lora_rank=4,
        lora_alpha=4.0,
        lora_lr=3e-2,
        epochs=1,
        quantize_base="nf4",
        train_text_encoder=False,
        cache_text_embeddings=True,
        optimizer="adamw",
    )
    from edtools.train.plan import check_run

    plan = check_run(config)
    parts = {name: (dtype, count) for name, dtype, count in plan.parts}
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(sd3_model / "transformer")
    # the run's own load is quantised too; the plan counts the weights (and LoRA's) as trained, not their
    # packed bytes
    base = sum(p.numel() for p in transformer.parameters())
    assert parts["transformer"] == ("nf4", base + plan.trained_parameters)
    events = []
    result = train(config, events.append)
    losses = [e.loss for e in events if e.kind == "step"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert hashes(sd3_model) == before  # the base model's files are never written

    checkpoint = Path(result.checkpoint)
    state = torch.load(checkpoint / "resume" / "state.pt", weights_only=True)["lora"]
    assert any(value.abs().sum() > 0 for key, value in state.items() if "lora_B" in key)  # B starts at 0
    tensors, metadata = read_lora_file(checkpoint / "lora.safetensors")
    assert {key.split(".")[0] for key in tensors} == {"transformer"}
    assert metadata["ss_network_dim"] == "4"

    # the file loads in diffusers' own pipeline of the plain (unquantised) model, and changes its output
    pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(
        str(sd3_model), text_encoder_3=None, tokenizer_3=None
    )
    pipeline.set_progress_bar_config(disable=True)

    def latents() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipeline(
            "a photo", num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent"
        ).images

    base = latents()
    pipeline.load_lora_weights(str(checkpoint), weight_name="lora.safetensors")
    assert (latents() - base).abs().max() > 1e-4


def test_flux_qlora_trains_and_its_file_changes_the_unquantised_pipeline(tree, tmp_path, cpu_quantization):
    """Flux.1 dev under nf4 (the flux-lora-24gb preset's way): the transformer's Linear layers are NF4, the
    adapters train, and FluxPipeline of the plain model loads the file and changes its output."""
    import bitsandbytes as bnb

    model = make_tiny_model(tmp_path / "flux", "flux-dev")
    quantized = load_components(str(model), keep=Keep(quantize="nf4"))
    assert all(
        isinstance(m, bnb.nn.Linear4bit) for m in quantized.unet.modules() if isinstance(m, torch.nn.Linear)
    )
    del quantized
    before = hashes(model)
    config = train_config(
        tree({"a": 3, "b": 3}),
        model,
        tmp_path / "out",
        lora_rank=4,
        lora_lr=3e-2,
        epochs=1,
        quantize_base="nf4",
        train_text_encoder=False,
        cache_text_embeddings=True,
        optimizer="adamw",
    )
    result = train(config)
    assert math.isfinite(result.last_loss) and hashes(model) == before
    pipeline = diffusers.FluxPipeline.from_pretrained(str(model))
    pipeline.set_progress_bar_config(disable=True)

    def latents() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipeline(
            "a photo",
            num_inference_steps=2,
            height=64,
            width=64,
            max_sequence_length=32,
            generator=generator,
            output_type="latent",
        ).images

    base = latents()
    pipeline.load_lora_weights(str(result.checkpoint), weight_name="lora.safetensors")
    assert (latents() - base).abs().max() > 1e-4
