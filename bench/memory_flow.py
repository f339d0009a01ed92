"""GPU memory of the flow-matching presets (SD3.5 Medium, Flux.1 dev), estimated on a CPU: no GPU measurement.

The real configs (written below, nothing downloaded) on the meta device give exact bytes; a traced step on fake tensors
gives the step's peak, as bench/memory.py does for the UNet presets (memory_trace.py's machinery).

Per preset: weights as the run keeps them (the frozen transformer in the mixed dtype, or in NF4 for quantize_base nf4:
bitsandbytes' Linear4bit holds 4 bits a weight plus, with double quantisation, one uint8 absmax per 64-value block and
one fp32 scale per 256 blocks; every other tensor stays in the mixed dtype), LoRA adapters, their fp32 gradients and
AdamW8bit state, then one training step with gradient checkpointing on fake tensors (cached latents and text
embeddings; the NF4 run is traced with bf16 Linear weights, whose step activations are the same, and the largest
Linear's dequantised bf16 copy is added: bitsandbytes dequantises one layer at a time). Before training the text
encoders encode the captions on the GPU beside the VAE, and beside the transformer only when it is NF4 (an
unquantised one waits on the CPU until they are done: train.setup.kept_as; Keep.device places the rest as it loads;
T5-XXL as transformers loads it: `wo` in fp32 under fp16 and t5 8bit, the other Linear weights int8 under 8bit), then
T5 is freed and the CLIP encoders leave for the CPU; in the first epoch the VAE (fp32) encodes each image inside the step, before the forward.
The NF4 byte rule is checked against a real quantised tiny SD3 transformer (CPU).

Run: python bench/memory_flow.py [--presets NAME ...] [--markdown]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass

from memory_budget import allowance, usable_gib, verdict
from memory_bytes import GIB, adamw8bit_state_bytes, gib
from memory_trace import cuda_autocast_rules, gpu_attention, live_tracker_class, tensors_of, to_fake

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

__all__ = ["MODELS", "main", "nf4_bytes"]

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# The 16-channel VAE both use (no quant convs; force_upcast: it encodes in fp32)
FLOW_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)  # fmt: skip
CLIP_G = dict(
    CLIP_L, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, hidden_act="gelu",
)  # fmt: skip
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False,
)  # fmt: skip


@dataclass(frozen=True)
class FlowModel:
    label: str
    transformer_class: str
    transformer: dict
    texts: tuple  # (name, kind "clip" | "t5", config); the encoders the family loads
    text_tokens: int  # tokens of the cached conditioning (CLIP 77 + T5's)
    pooled: int
    t5_tokens: int  # the tokens T5 encodes (SD3: the pipeline's max_sequence_length 256; Flux: 512)


MODELS = {
    # edtools' SD3 family loads CLIP-L, CLIP-G and T5-XXL (its 256 tokens after the 77 CLIP ones)
    "sd3": FlowModel(
        "SD3.5 Medium", "SD3Transformer2DModel", SD35M_TRANSFORMER,
        (("text_encoder", "clip", CLIP_L), ("text_encoder_2", "clip", CLIP_G), ("text_encoder_3", "t5", T5_XXL)),
        77 + 256, 2048, 256,
    ),
    "flux": FlowModel(
        "Flux.1 dev", "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER,
        (("text_encoder", "clip", CLIP_L), ("text_encoder_2", "t5", T5_XXL)), 512, 768, 512,
    ),
}  # fmt: skip


def build(kind: str, config: dict):
    """A meta-device model: a transformer class name, "vae", "clip" or "t5"."""
    import diffusers
    import torch
    import transformers

    with torch.device("meta"):
        if kind == "vae":
            return diffusers.AutoencoderKL(**config)
        if kind == "clip":
            cfg = transformers.CLIPTextConfig(**config)
            cfg._attn_implementation = "sdpa"
            return transformers.CLIPTextModelWithProjection(cfg)
        if kind == "t5":
            return transformers.T5EncoderModel(transformers.T5Config(**config))
        return getattr(diffusers, kind)(**config)


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight (bitsandbytes' 64-value blocks): packed 4-bit values and its absmax (uint8 per block
    with a fp32 per 256 blocks under double quantisation, else a fp32 per block)."""
    blocks = -(-numel // 64)
    if not double_quant:
        return -(-numel // 2) + 4 * blocks
    return -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4  # + the nested quantisation's fp32 offset


def t5_bytes(encoder, dtype_size: int, t5: str, fp16: bool) -> int:
    """Bytes of a T5 encoder as transformers loads it: its `wo` layers (T5's _keep_in_fp32_modules) stay float32 when
    the dtype is float16 (not bfloat16) and under 8-bit; with t5 "8bit" every other Linear weight is int8 (one byte a
    weight, plus LLM.int8's fp32 scale per output row) and the rest (embedding, norms) in the mixed dtype."""
    import torch

    linear = {id(m.weight): m.weight.shape[0] for m in encoder.modules() if isinstance(m, torch.nn.Linear)}
    fp32 = (
        {id(m.weight) for name, m in encoder.named_modules() if name.endswith(".wo")}
        if fp16 or t5 == "8bit"
        else set()
    )
    total = 0
    for p in encoder.parameters():
        if id(p) in fp32:
            total += 4 * p.numel()
        elif t5 == "8bit" and id(p) in linear:
            total += p.numel() + 4 * linear[id(p)]
        else:
            total += dtype_size * p.numel()
    return total


def weight_bytes(module, dtype_size: int, nf4: bool) -> tuple[int, int]:
    """(bytes as kept, bytes of the largest Linear weight in the mixed dtype): nf4 quantises every nn.Linear
    weight (as diffusers' bnb quantiser replaces them), the rest stays in the mixed dtype."""
    import torch

    linear = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear)}
    total = largest = 0
    for p in module.parameters():
        if nf4 and id(p) in linear:
            total += nf4_bytes(p.numel())
            largest = max(largest, p.numel() * dtype_size)
        else:
            total += p.numel() * dtype_size
    return total, largest


def check_nf4_rule() -> tuple[int, int]:
    """(the rule's bytes, bitsandbytes' bytes) of a tiny SD3 transformer quantised for real on the CPU."""
    import tempfile

    import diffusers
    import torch
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    from edtools.models import make_tiny_model
    from edtools.models.quantize import quantized_loading

    BnB4BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None  # diffusers' GPU gate only
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_model(os.path.join(tmp, "m"), "sd3", real_blocks=True)
        plain = diffusers.SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
        quantized = diffusers.SD3Transformer2DModel.from_pretrained(
            folder, subfolder="transformer", torch_dtype=torch.bfloat16,
            **quantized_loading("nf4", torch.bfloat16, "cpu"),
        )  # fmt: skip
    actual = 0
    for m in quantized.modules():
        if isinstance(m, torch.nn.Linear):
            state = m.weight.quant_state
            tensors = [m.weight, state.absmax, state.state2.absmax, state.offset]
            actual += sum(t.numel() * t.element_size() for t in tensors)
    rule = sum(nf4_bytes(m.weight.numel()) for m in plain.modules() if isinstance(m, torch.nn.Linear))
    return rule, actual


def add_lora(transformer, rank: int, architecture: str) -> list:
    """peft adapters on the family's own LoRA targets (models.families: SD3's joint attention; Flux's every
    linear layer of its double- and single-stream blocks)."""
    from peft import LoraConfig

    from edtools.models.families import family

    transformer.requires_grad_(False)
    targets = family(architecture).unet_lora_pattern
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    return [p for p in transformer.parameters() if p.requires_grad]


def step_inputs(model: FlowModel, batch: int, resolution: int, dtype):
    """The transformer's keyword arguments of one step from cached latents and text embeddings."""
    import torch

    side = resolution // 8
    hidden = torch.empty(batch, model.text_tokens, 4096)
    kwargs = dict(encoder_hidden_states=hidden, pooled_projections=torch.empty(batch, model.pooled))
    if model.transformer_class == "FluxTransformer2DModel":  # packed 2x2 latents, position ids, guidance
        tokens = (side // 2) ** 2
        kwargs.update(
            hidden_states=torch.empty(batch, tokens, 64),
            img_ids=torch.zeros(tokens, 3),
            txt_ids=torch.zeros(model.text_tokens, 3),
            guidance=torch.ones(batch),
            timestep=torch.rand(batch),
        )
    else:
        kwargs.update(hidden_states=torch.empty(batch, 16, side, side), timestep=torch.rand(batch) * 1000)
    return kwargs


def estimate(name: str) -> dict:
    """One preset's bytes: resident weights, LoRA training state, the traced step and the caching pass."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from edtools.presets import PRESETS

    torch.set_num_threads(1)
    preset = PRESETS[name]
    s = preset.settings
    model = MODELS[preset.architecture]
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[s["mixed_precision"]]
    size = torch.empty(0, dtype=low).element_size()
    nf4 = s.get("quantize_base", "none") == "nf4"
    started = time.perf_counter()
    out: dict = {"name": name, "gpu_gib": preset.gpu_gib}

    transformer = build(model.transformer_class, model.transformer)
    out["parameters"] = sum(p.numel() for p in transformer.parameters())
    out["transformer"], largest = weight_bytes(transformer, size, nf4)
    out["transformer_half"] = out["parameters"] * size
    trainable = add_lora(transformer, s["lora_rank"], preset.architecture)
    out["lora_parameters"] = sum(p.numel() for p in trainable)
    out["lora"] = 4 * out["lora_parameters"]  # fp32 adapters
    out["optimizer"] = adamw8bit_state_bytes(trainable)

    mode = FakeTensorMode()
    to_fake(transformer, mode, lambda p: torch.float32 if p.requires_grad else low)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    tracker = live_tracker_class()
    with mode, cuda_autocast_rules(), gpu_attention("efficient") as calls:
        live = tracker(tensors_of(transformer))
        with live, torch.autocast("cpu", dtype=low):
            kwargs = step_inputs(model, s["batch_size"], s["resolution"], low)
            pred = transformer(**kwargs).sample
            loss = ((pred.float() - torch.randn_like(pred.float())) ** 2).mean()
            loss.backward()  # the adapters' fp32 gradients are counted in the peak
            del pred, loss, kwargs
        out["step_peak"] = live.peak
    if calls[0] == 0:
        raise RuntimeError("the attention patch was never called: the estimate would use another kernel")
    out["dequantised"] = largest if nf4 else 0
    out["tensor_peak"] = (
        out["transformer"] + out["lora"] + out["optimizer"] + out["step_peak"] + out["dequantised"]
    )
    out["estimate"] = out["tensor_peak"] + allowance(out["tensor_peak"])
    del transformer, trainable
    gc.collect()

    # caching the captions: everything loaded on the GPU, one caption at a time through each encoder; caching the
    # latents (first epoch): the VAE encodes one image in fp32 beside the transformer and the LoRA training state
    text_transients = []
    with mode, torch.no_grad(), gpu_attention("efficient"):
        vae = build("vae", FLOW_VAE)
        to_fake(vae, mode, lambda p: torch.float32)
        out["vae"] = sum(p.numel() * 4 for p in vae.parameters())
        live = tracker(tensors_of(vae))
        with live:
            vae.encode(torch.empty(1, 3, s["resolution"], s["resolution"])).latent_dist.mode()
        vae_transient = live.peak
        del vae
        out["text_encoders"] = out["t5"] = 0
        for _, kind, config in model.texts:
            encoder = build(kind, config)
            if kind == "t5":  # as loaded: float32 `wo` in fp16 and 8-bit, int8 Linear weights in 8-bit
                out["t5"] = t5_bytes(encoder, size, s.get("t5", "load"), low == torch.float16)
                out["text_encoders"] += out["t5"]
            else:
                out["text_encoders"] += sum(p.numel() * size for p in encoder.parameters())
            to_fake(encoder, mode, lambda p: low)
            live = tracker(tensors_of(encoder))
            with live, torch.autocast("cpu", dtype=low):
                tokens = 77 if kind == "clip" else model.t5_tokens
                encoder(torch.zeros(1, tokens, dtype=torch.long), output_hidden_states=True)
            text_transients.append(live.peak)
            del encoder
    # a LoRA run that caches its captions places an unquantised transformer only after they are encoded and T5 is
    # freed (train.setup.kept_as); an NF4 one is loaded straight onto the GPU, so it is there while they are
    text_peak = (out["transformer"] if nf4 else 0) + out["vae"] + out["text_encoders"] + max(text_transients)
    latent_peak = out["transformer"] + out["vae"] + out["lora"] + out["optimizer"] + vae_transient
    out["text_caching"] = text_peak + allowance(text_peak)
    out["latent_caching"] = latent_peak + allowance(latent_peak)
    out["caching"] = max(out["text_caching"], out["latent_caching"])
    # host RAM while loading: each part is read (safetensors, memory-mapped, shard by shard) and moved to the GPU
    # before the next; a quantised transformer goes weight by weight straight to the GPU (device_map), so the largest
    # part read at once is the largest text encoder or the unquantised transformer (file-backed pages where the file
    # holds the kept dtype, as bench/host_memory.py measured for SDXL; an 8-bit T5 goes weight by weight to the GPU
    # too). After caching the captions a LoRA run frees T5 (fill_text_cache) and moves the CLIP encoders to host RAM,
    # where they stay.
    encoders = [
        out["t5"] if k == "t5" else sum(p.numel() * size for p in build(k, c).parameters())
        for _, k, c in model.texts
    ]
    eight_bit = s.get("t5", "load") == "8bit"
    read = [b for (_, k, _), b in zip(model.texts, encoders, strict=True) if not (k == "t5" and eight_bit)]
    out["host_part"] = max(read + ([] if nf4 else [out["transformer"]]))
    out["host_after"] = sum(b for (_, k, _), b in zip(model.texts, encoders, strict=True) if k != "t5")
    out["seconds"] = time.perf_counter() - started
    gc.collect()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", metavar="NAME", help="only these presets")
    parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md table")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from edtools.presets import PRESETS

    names = args.presets or [n for n, p in PRESETS.items() if p.architecture in MODELS]
    rule, actual = check_nf4_rule()
    print(
        f"NF4 rule check, tiny SD3 transformer quantised by bitsandbytes on the CPU: rule {rule} B, real {actual} B"
    )
    rows = [estimate(name) for name in names]
    header = (
        "| preset | transformer params | transformer as kept (bf16/fp16 size) | LoRA params | LoRA + AdamW8bit | "
        "step activations | step estimate | caption caching (text encoders) | first-epoch VAE encode | GPU usable | "
        "verdict |"
    )
    print("\nESTIMATES from byte counts and a fake-tensor step (no GPU measurement), GiB\n")
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        worst = max(r["estimate"], r["caching"])
        print(
            f"| {r['name']} | {r['parameters']:,} | {gib(r['transformer'])} ({gib(r['transformer_half'])}) | "
            f"{r['lora_parameters']:,} | {gib(r['lora'] + r['optimizer'])} | {gib(r['step_peak'])} | "
            f"**{gib(r['estimate'])}** | {gib(r['text_caching'])} ({gib(r['text_encoders'])}) | "
            f"{gib(r['latent_caching'])} | "
            f"{usable_gib(r['gpu_gib']):.2f} | {verdict(worst, r['gpu_gib'])} |"
        )
    print()
    for r in rows:
        print(
            f"{r['name']}: estimated_gib=({r['estimate'] / GIB:.2f}, {r['caching'] / GIB:.2f}); "
            f"dequantised Linear transient {gib(r['dequantised'])} GiB; traced in {r['seconds']:.0f} s; host RAM: "
            f"largest part read at once while loading {gib(r['host_part'])} GiB, text encoders kept there after caching "
            f"{gib(r['host_after'])} GiB (T5, {gib(r['t5'])} GiB on the GPU while caching, is freed)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
