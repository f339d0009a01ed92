"""GPU memory each training preset needs, estimated on a CPU: estimates (no GPU measurement).

1. Weights, gradients and optimizer state: exact bytes from the real SD1.5 / SDXL configs (UNet, VAE, text
   encoders), built on the meta device (no weights, nothing downloaded).
2. One training step (text encoder when trained, UNet forward under autocast, MSE loss, backward) runs on fake
   tensors (torch's FakeTensorMode: shapes and dtypes, no data) while a dispatch mode adds up the bytes of every
   tensor storage alive, so the step's peak includes the activations saved for backward, the gradients, the
   autocast copies of fp32 weights, gradient-checkpointing recomputation and transient buffers. Fake tensors sit
   on the "cpu" device, so autocast is CPU autocast with CUDA's cast rules laid over it (ops CUDA runs in fp32 -
   group_norm, layer_norm, softmax, upsample_nearest2d, ... - get Python autocast kernels); attention runs
   torch's memory-efficient SDPA kernel as on a GPU (no materialised attention matrix).
   Every op runs at the real sizes this way: nothing is measured at a reduced size and extrapolated.
3. A cross-check on the CPU with real tensors (a child process): the SD1.5 UNet with LoRA at 256 px, fp32, its
   peak RSS rise over one step against the fake-tensor prediction for the same step.
4. Per preset: weights + gradients + optimizer state + step peak + an allowance for the CUDA context and the
   caching allocator, the caching pass's peak beside it, and a verdict against the preset's GPU; for presets
   that do not fit, the first of a few setting changes that would.

Run: python bench/memory.py [--presets NAME ...] [--quick] [--markdown] [--jobs N]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field

from configs import (  # bench/ is on sys.path when a script runs
    CLIP_L_TEXT,
    OPENCLIP_BIGG_TEXT,
    SD15_UNET,
    SD_VAE,
    SDXL_UNET,
    SDXL_VAE,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

GIB = 2**30

# ---------------------------------------------------------------------------------------------------------------
# Real configs: bench/configs.py (from stabilityai/stable-diffusion-xl-base-1.0 and stable-diffusion-v1-5).
# ---------------------------------------------------------------------------------------------------------------

TEXT_TOKENS = 77
# peft LoRA on the UNet as kohya targets it: attention projections, proj_in/proj_out and the feed-forward.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass(frozen=True)
class Arch:
    unet: dict
    vae: dict
    texts: tuple  # (name, config, with_projection)
    cross_dim: int
    vae_fp32: bool  # the VAE config has force_upcast: it runs in fp32


ARCHS = {
    "sd": Arch(SD15_UNET, SD_VAE, (("text_encoder", CLIP_L_TEXT, False),), 768, False),
    "sdxl": Arch(
        SDXL_UNET,
        SDXL_VAE,
        (("text_encoder", CLIP_L_TEXT, False), ("text_encoder_2", OPENCLIP_BIGG_TEXT, True)),
        2048,
        True,
    ),
}
ARCH_LABEL = {"sd": "SD1.5", "sdxl": "SDXL"}

# What torch reports as a GPU's total memory, for the sizes presets name (GiB): Colab's T4 (diffusers #4872's log
# shows "14.75 GiB total capacity"), and the smallest common 24 GB cards (A10G / L4 report about 22 GiB; an RTX
# 3090 / 4090 reports 23.6).
USABLE_GIB = {16: 14.75, 24: 22.0}
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS / cuDNN workspaces
FRAGMENTATION = 0.10  # caching-allocator rounding and fragmentation, on top of the tensor peak
FITS = 0.85  # "fits" leaves this much of the usable memory as margin for the estimate's own error

# ---------------------------------------------------------------------------------------------------------------
# Models on the meta device, then as fake tensors.
# ---------------------------------------------------------------------------------------------------------------


def build_unet(arch: str, lora_rank: int = 0, lora_alpha: float | None = None):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS[arch].unet)
        if lora_rank:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha or lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=LORA_TARGETS,
                )
            )
    return unet


def build_text(config: dict, with_projection: bool):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**config)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_vae(arch: str):
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**ARCHS[arch].vae)


def to_fake(module, mode, dtype_of) -> None:
    """Swap every parameter and buffer of a meta-device module for a fake CPU tensor (dtype_of(param) for
    parameters; buffers keep their dtype)."""
    import torch

    done: dict[int, torch.Tensor] = {}
    with mode:
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    fake = torch.empty(p.shape, dtype=dtype_of(p), device="cpu")
                    done[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                mod._parameters[name] = done[id(p)]
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")


def tensors_of(*modules) -> list:
    """Every parameter and buffer of the modules."""
    return [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]


def nbytes(params, dtype_size: int) -> int:
    return sum(p.numel() for p in params) * dtype_size


def adamw8bit_state_bytes(params) -> int:
    """bitsandbytes AdamW8bit state: tensors of >= 4096 values keep two uint8 states and one fp32 absmax per
    256-value block each; smaller tensors keep two fp32 states; plus the two shared 256-entry fp32 quantile maps."""
    total = 2 * 256 * 4
    for p in params:
        n = p.numel()
        if n < 4096:
            total += 8 * n
        else:
            total += 2 * (n + 4 * -(-n // 256))
    return total


def optimizer_state_bytes(optimizer: str, params) -> int:
    if optimizer == "adamw8bit":
        return adamw8bit_state_bytes(params)
    if optimizer == "adamw":
        return nbytes(params, 8)
    raise ValueError(f"unknown optimizer {optimizer!r}")


# ---------------------------------------------------------------------------------------------------------------
# CUDA's autocast rules on CPU fake tensors, memory-efficient attention, and the live-bytes tracker.
# ---------------------------------------------------------------------------------------------------------------

# torch 2.13's AutocastCUDA lists (ATen/autocast_mode.h: AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE). CPU autocast
# already casts the matmul / conv / linear family to the low dtype as CUDA does (with the same weight cache).
CUDA_FP32_OPS = (
    "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar "
    "pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm rms_norm group_norm frobenius_norm.dim "
    "nuclear_norm nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d "
    "hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss "
    "multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss "
    "binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp upsample_nearest1d "
    "_upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d upsample_nearest3d "
    "_upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d "
    "upsample_bicubic2d _upsample_bicubic2d_aa"
).split()
CUDA_FP32_SET_OPT_DTYPE_OPS = (
    "prod prod.dim_int softmax.int log_softmax.int cumprod cumsum linalg_vector_norm linalg_matrix_norm "
    "linalg_matrix_norm.str_ord sum sum.dim_IntList"
).split()


def _overload(name: str):
    import torch

    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


@contextlib.contextmanager
def cuda_autocast_rules():
    """While active, CPU autocast casts like CUDA autocast for the ops CUDA runs in fp32."""
    import torch
    from torch.utils._pytree import tree_map_only

    low = (torch.float16, torch.bfloat16)
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def up(t):
        return t.to(torch.float32) if t.dtype in low else t

    def fp32_kernel(op):
        def kernel(*args, **kwargs):
            args, kwargs = tree_map_only(torch.Tensor, up, (args, kwargs))
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*args, **kwargs)

        return kernel

    def opt_dtype_kernel(op):
        names = [a.name for a in op._schema.arguments]
        index = names.index("dtype")
        kwarg_only = op._schema.arguments[index].kwarg_only

        def kernel(*args, **kwargs):
            first = args[0]
            if first.is_floating_point() and first.dtype != torch.float64:
                if kwarg_only or len(args) <= index:
                    if kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                elif args[index] is None:
                    args = (*args[:index], torch.float32, *args[index + 1 :])
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*args, **kwargs)

        return kernel

    lib = torch.library.Library("aten", "IMPL")
    with contextlib.ExitStack() as stack:
        stack.callback(lib._destroy)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in CUDA_FP32_OPS:
                lib.impl(name, fp32_kernel(_overload(name)), "AutocastCPU")
            for name in CUDA_FP32_SET_OPT_DTYPE_OPS:
                lib.impl(name, opt_dtype_kernel(_overload(name)), "AutocastCPU")
        yield


@contextlib.contextmanager
def gpu_attention(kernel: str = "efficient"):
    """F.scaled_dot_product_attention as a GPU runs it in training: the memory-efficient kernel (flash keeps the
    same tensors for backward: q, k, v, output, logsumexp), never a materialised attention matrix. kernel
    'cpu_flash' uses the CPU flash kernel instead (for the real-tensor cross-check). Counts calls."""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    calls = [0]

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls[0] += 1
        if torch.is_autocast_enabled("cpu"):  # SDPA is on autocast's low-precision list
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(dtype) for t in (query, key, value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        elif attn_mask is not None:
            attn_mask = attn_mask.to(query.dtype)
        if kernel == "cpu_flash" and attn_mask is None:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, scale=scale
            )
            return out[0]
        if kernel == "cpu_flash":
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if attn_mask is not None:
            attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale
        )
        return out[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def _live_tracker_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveBytes(TorchDispatchMode):
        """Bytes of tensor storages created while active and still alive: current and peak. Storages of
        `existing` tensors (weights, buffers: counted elsewhere) are never counted, views of them included."""

        def __init__(self, existing=()):
            super().__init__()
            self.seen = WeakIdKeyDictionary()
            for t in existing:
                self.seen[t.untyped_storage()] = False
            self.current = 0
            self.peak = 0

        def _free(self, n: int) -> None:
            self.current -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
            for t in outs:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage in self.seen:
                        continue
                    n = storage.nbytes()
                    self.seen[storage] = True
                    weakref.finalize(storage, self._free, n)
                    self.current += n
                    self.peak = max(self.peak, self.current)
            return out

    return LiveBytes


@contextlib.contextmanager
def saved_tensor_bytes(exclude_params):
    """Bytes of the tensors autograd saves for backward (each storage once; parameters excluded)."""
    import torch

    skip = {p.untyped_storage()._cdata for p in exclude_params}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            storages[storage._cdata] = storage.nbytes()
        return t

    result = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result[0] = sum(storages.values())


# ---------------------------------------------------------------------------------------------------------------
# One training step on fake tensors.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    arch: str
    resolution: int
    batch_size: int
    mixed_precision: str  # fp16 | bf16 | no
    gradient_checkpointing: bool
    optimizer: str = "adamw8bit"
    lora_rank: int = 0
    lora_alpha: float | None = None
    train_text_encoder: bool = False
    train_text_encoder_2: bool = False
    cache_latents: bool = True
    cache_text_embeddings: bool = False
    half_weights: bool = False  # trained weights and their gradients in the mixed dtype, no fp32 master copy

    @classmethod
    def from_preset(cls, preset, **changes) -> Setup:
        s = dict(preset.settings)
        fields = dict(
            arch=preset.architecture,
            resolution=s["resolution"],
            batch_size=s["batch_size"],
            mixed_precision=s["mixed_precision"],
            gradient_checkpointing=bool(s["gradient_checkpointing"]),
            optimizer=s["optimizer"],
            lora_rank=s.get("lora_rank", 0),
            lora_alpha=s.get("lora_alpha"),
            train_text_encoder=bool(s.get("train_text_encoder", False)),
            train_text_encoder_2=bool(s.get("train_text_encoder_2", s.get("train_text_encoder", False)))
            and preset.architecture == "sdxl",
            cache_latents=bool(s.get("cache_latents", False)),
            cache_text_embeddings=bool(s.get("cache_text_embeddings", False)),
        )
        fields.update(changes)
        return cls(**fields)

    def describe(self) -> str:
        mode = f"LoRA r{self.lora_rank}" if self.lora_rank else "full"
        if self.half_weights:
            mode += f" ({self.mixed_precision} weights, no fp32 master)"
        ckpt = "ckpt" if self.gradient_checkpointing else "no ckpt"
        return f"{ARCH_LABEL[self.arch]} {mode} {self.resolution}px b{self.batch_size} {self.mixed_precision} {ckpt}"


@dataclass
class StepMemory:
    setup: Setup
    weights: dict = field(default_factory=dict)  # component -> bytes resident during steps
    trainable_params: int = 0
    grads: int = 0  # fp32 gradients of every trainable parameter (inside step_peak)
    optimizer: int = 0
    held_after_forward: int = 0  # tracked bytes alive when the forward ends (activations for backward)
    saved_for_backward: int | None = None  # saved-tensor hook sum (without checkpointing only)
    step_peak: int = 0  # tracked peak over one forward + backward, above the resident weights
    seconds: float = 0.0

    @property
    def resident(self) -> int:
        return sum(self.weights.values()) + self.optimizer

    @property
    def tensor_peak(self) -> int:
        return self.resident + self.step_peak

    @property
    def allowance(self) -> int:
        return int(CONTEXT_GIB * GIB + FRAGMENTATION * self.tensor_peak)

    @property
    def estimate(self) -> int:
        return self.tensor_peak + self.allowance


def _dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]


def _autocast(precision: str):
    import torch

    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=_dtype(precision))


def _enable_text_checkpointing(text_encoder) -> None:
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5
        text_encoder.activation_checkpointing_enable({"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def simulate_step(setup: Setup, attention: str = "efficient") -> StepMemory:
    """Resident weights and optimizer state (exact), and one training step's tracked memory (fake tensors)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    arch = ARCHS[setup.arch]
    low = _dtype(setup.mixed_precision)
    result = StepMemory(setup)
    mode = FakeTensorMode()
    trainable = []

    unet = build_unet(setup.arch, setup.lora_rank, setup.lora_alpha)
    # full: fp32 master weights; LoRA: frozen base in the mixed dtype, adapters in fp32
    trained_dtype = low if setup.half_weights else torch.float32
    to_fake(unet, mode, lambda p: trained_dtype if p.requires_grad else low)
    if setup.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    unet_params = list(unet.parameters())
    trainable += [p for p in unet_params if p.requires_grad]
    result.weights["unet"] = sum(p.numel() * p.element_size() for p in unet_params)

    encoders = []
    for name, config, projection in arch.texts:
        trained = setup.train_text_encoder if name == "text_encoder" else setup.train_text_encoder_2
        if not trained and setup.cache_text_embeddings:
            continue  # cached: the encoder leaves the GPU after the caching pass
        encoder = build_text(config, projection)
        encoder.requires_grad_(trained)
        to_fake(encoder, mode, lambda p, trained=trained: trained_dtype if trained else low)
        if trained:
            encoder.train()
            if setup.gradient_checkpointing:
                _enable_text_checkpointing(encoder)
            trainable += list(encoder.parameters())
        else:
            encoder.eval()
        encoders.append((name, encoder, trained))
        result.weights[name] = sum(p.numel() * p.element_size() for p in encoder.parameters())

    vae = None
    if not setup.cache_latents:
        vae = build_vae(setup.arch)
        vae.requires_grad_(False).eval()
        to_fake(vae, mode, lambda p: torch.float32 if arch.vae_fp32 else low)
        result.weights["vae"] = sum(p.numel() * p.element_size() for p in vae.parameters())

    result.trainable_params = sum(p.numel() for p in trainable)
    result.grads = sum(p.numel() * p.element_size() for p in trainable)
    result.optimizer = optimizer_state_bytes(setup.optimizer, trainable)

    b, side = setup.batch_size, setup.resolution // 8
    LiveBytes = _live_tracker_class()
    with mode, cuda_autocast_rules(), gpu_attention(attention) as attention_calls:
        live = LiveBytes(tensors_of(unet, vae, *(e for _, e, _ in encoders)))
        with live:
            if vae is not None:  # a fresh encode each step; its transient is over before the forward starts
                with torch.no_grad():
                    pixels = torch.empty(b, 3, setup.resolution, setup.resolution, dtype=vae.dtype)
                    latents = vae.encode(pixels).latent_dist.sample().float()
                del pixels
            else:  # cached latents, moved to the GPU per batch
                latents = torch.empty(b, 4, side, side)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (b,))
            noisy = latents + noise
            input_ids = torch.zeros(b, TEXT_TOKENS, dtype=torch.long)
            hook_params = unet_params + [p for _, e, _ in encoders for p in e.parameters()]
            hooks = (
                saved_tensor_bytes(hook_params)
                if not setup.gradient_checkpointing
                else contextlib.nullcontext([None])
            )
            with hooks as saved, _autocast(setup.mixed_precision):
                hidden_parts, pooled = [], None
                for name, config, projection in arch.texts:
                    found = [(e, t) for n, e, t in encoders if n == name]
                    if not found:  # cached embeddings
                        hidden_parts.append(torch.empty(b, TEXT_TOKENS, config["hidden_size"]))
                        if projection:
                            pooled = torch.empty(b, 1280)
                        continue
                    encoder, trained = found[0]
                    with torch.set_grad_enabled(trained):
                        out = encoder(input_ids, output_hidden_states=setup.arch == "sdxl")
                    hidden_parts.append(out.hidden_states[-2] if setup.arch == "sdxl" else out[0])
                    if projection:
                        pooled = out.text_embeds
                hidden = torch.cat(hidden_parts, dim=-1) if len(hidden_parts) > 1 else hidden_parts[0]
                kwargs = {}
                if setup.arch == "sdxl":
                    kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.empty(b, 6)}
                pred = unet(noisy, timesteps, hidden, **kwargs).sample
            result.held_after_forward = live.current
            result.saved_for_backward = saved[0]
            per_sample = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
            loss = per_sample.mean()
            loss.backward()
            del pred, per_sample, loss, hidden, hidden_parts, pooled, noisy, noise, latents
        result.step_peak = live.peak
    if attention_calls[0] == 0:
        raise RuntimeError("the attention patch was never called: the estimate would use another kernel")
    result.seconds = time.perf_counter() - start
    del unet, encoders, vae, trainable, unet_params, hook_params
    gc.collect()
    return result


@dataclass
class CachingPass:
    resident: dict  # component -> bytes on the GPU while caching
    vae_transient: int  # tracked peak of one VAE encode of a batch
    text_transient: int
    seconds: float = 0.0

    @property
    def tensor_peak(self) -> int:
        return sum(self.resident.values()) + max(self.vae_transient, self.text_transient)

    @property
    def estimate(self) -> int:
        return self.tensor_peak + int(CONTEXT_GIB * GIB + FRAGMENTATION * self.tensor_peak)


def simulate_caching(setup: Setup, step: StepMemory) -> CachingPass:
    """The caching pass, before training: the VAE (fp32 for SDXL: force_upcast; else the mixed dtype) encodes one
    image at a time at the training resolution (as edtools' LatentCache does), frozen text encoders (mixed dtype) encode one batch of captions, under
    no_grad. Assumed resident meanwhile: the UNet as it trains (no gradients or optimizer state yet) and every
    text encoder (trained ones in fp32)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    arch = ARCHS[setup.arch]
    low = _dtype(setup.mixed_precision)
    trained_dtype = low if setup.half_weights else torch.float32
    mode = FakeTensorMode()
    resident = {"unet": step.weights["unet"]}
    LiveBytes = _live_tracker_class()
    b, res = setup.batch_size, setup.resolution
    vae_transient = text_transient = 0
    with mode, gpu_attention("efficient"), torch.no_grad():
        if setup.cache_latents:
            vae = build_vae(setup.arch)
            vae_dtype = torch.float32 if arch.vae_fp32 else low
            to_fake(vae, mode, lambda p: vae_dtype)
            resident["vae"] = sum(p.numel() * p.element_size() for p in vae.parameters())
            live = LiveBytes(tensors_of(vae))
            with live:
                pixels = torch.empty(1, 3, res, res, dtype=vae_dtype)
                vae.encode(pixels).latent_dist.mode()
                del pixels
            vae_transient = live.peak
            del vae
        for name, config, projection in arch.texts:
            trained = setup.train_text_encoder if name == "text_encoder" else setup.train_text_encoder_2
            encoder = build_text(config, projection)
            to_fake(encoder, mode, lambda p, trained=trained: trained_dtype if trained else low)
            resident[name] = sum(p.numel() * p.element_size() for p in encoder.parameters())
            if setup.cache_text_embeddings and not trained:
                live = LiveBytes(tensors_of(encoder))
                with live:
                    encoder(torch.zeros(b, TEXT_TOKENS, dtype=torch.long), output_hidden_states=True)
                text_transient = max(text_transient, live.peak)
            del encoder
    gc.collect()
    return CachingPass(resident, vae_transient, text_transient, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------
# Cross-check on the CPU with real tensors (run in a child process: clean RSS, memory returned on exit).
# ---------------------------------------------------------------------------------------------------------------

CROSS_CHECK = dict(resolution=256, batch_size=1, lora_rank=32, lora_alpha=16.0)


def cross_check_setup(checkpointing: bool) -> Setup:
    return Setup(
        "sd",
        CROSS_CHECK["resolution"],
        CROSS_CHECK["batch_size"],
        "no",
        checkpointing,
        lora_rank=CROSS_CHECK["lora_rank"],
        lora_alpha=CROSS_CHECK["lora_alpha"],
        cache_text_embeddings=True,
    )


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process, bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


_HIGHEST_RSS = [0]  # the process's peak RSS, kept across resets of the kernel's high-water mark


def _reset_peak_rss() -> bool:
    _HIGHEST_RSS[0] = max(_HIGHEST_RSS[0], _rss()[1])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cross_check_child() -> dict:
    """Real SD1.5 UNet (random weights, fp32, CPU) with LoRA, one forward + backward per mode: the peak RSS rise
    over the step (after a warm-up step), with oneDNN convolutions and with them off (torch's own conv kernels,
    no weight-layout copies), the RSS rise when the forward ends, the saved-tensor hook sum, and the live-bytes
    tracker on the real tensors. Large allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so freed memory leaves
    the RSS at once."""
    import torch

    torch.manual_seed(0)
    unet = build_unet("sd", CROSS_CHECK["lora_rank"], CROSS_CHECK["lora_alpha"])
    unet.to_empty(device="cpu")
    params = list(unet.parameters())
    pool = torch.randn(max(p.numel() for p in params)) * 0.02  # copied in: much faster than normal_
    with torch.no_grad():
        for p in params:
            p.view(-1).copy_(pool[: p.numel()])
        for b in unet.buffers():
            b.zero_()
    del pool
    unet.train()
    side = CROSS_CHECK["resolution"] // 8
    bsz = CROSS_CHECK["batch_size"]
    latents = torch.randn(bsz, 4, side, side)
    hidden = torch.randn(bsz, TEXT_TOKENS, 768)
    timesteps = torch.randint(0, 1000, (bsz,))
    largest_conv = max(m.weight.nbytes for m in unet.modules() if isinstance(m, torch.nn.Conv2d))

    def step(measure_saved: bool) -> dict:
        noise = torch.randn_like(latents)
        hooks = saved_tensor_bytes(params) if measure_saved else contextlib.nullcontext([None])
        with hooks as saved:
            pred = unet(latents + noise, timesteps, hidden).sample
        after_forward = _rss()[0]
        ((pred.float() - noise) ** 2).mean().backward()
        del pred, noise
        for p in params:
            p.grad = None
        return {"rss_after_forward": after_forward, "saved": saved[0]}

    results = {}
    with gpu_attention("cpu_flash"):
        for checkpointing in (False, True):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            step(False)  # warm-up: thread pools, oneDNN primitives
            gc.collect()
            before = _rss()[0]
            can_reset = _reset_peak_rss()
            measured = step(measure_saved=not checkpointing)
            peak = _rss()[1]
            with torch.backends.mkldnn.flags(enabled=False):
                gc.collect()
                before_plain = _rss()[0]
                _reset_peak_rss()
                step(False)
                peak_plain = _rss()[1]
            live = _live_tracker_class()([*tensors_of(unet), latents, hidden, timesteps])
            with live:
                noise = torch.randn_like(latents)
                pred = unet(latents + noise, timesteps, hidden).sample
                held = live.current
                ((pred.float() - noise) ** 2).mean().backward()
                del pred, noise
            for p in params:
                p.grad = None
            results["on" if checkpointing else "off"] = {
                "peak_rss_rise": peak - before if can_reset else None,
                "peak_rss_rise_no_onednn": peak_plain - before_plain if can_reset else None,
                "rss_rise_after_forward": measured["rss_after_forward"] - before,
                "saved_for_backward": measured["saved"],
                "real_tracker_peak": live.peak,
                "real_tracker_held": held,
            }
    results["largest_conv_weight"] = largest_conv
    results["child_peak_rss"] = max(_HIGHEST_RSS[0], _rss()[1])
    return results


def start_cross_check() -> subprocess.Popen:
    """The real-tensor run, in a child process (its own RSS; its memory goes back when it exits), started early so
    it overlaps the fake-tensor runs (one torch thread each on the 2 cores)."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "OMP_NUM_THREADS": "1",
    }
    args = [sys.executable, os.path.abspath(__file__), "--cross-check-child"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_cross_check(child: subprocess.Popen, fakes: dict) -> dict:
    """The child's measurements beside the fake-tensor predictions for the same steps (fakes[checkpointing])."""
    out, err = child.communicate()
    if child.returncode:
        raise RuntimeError(f"cross-check child failed:\n{err[-3000:]}")
    real = json.loads(out.strip().splitlines()[-1])
    for mode, checkpointing in (("off", False), ("on", True)):
        fake = fakes[checkpointing]
        real[mode].update(
            fake_step_peak=fake.step_peak,
            fake_held=fake.held_after_forward,
            fake_saved=fake.saved_for_backward,
        )
    return real


# ---------------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------------


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def component_table() -> list[tuple]:
    rows = []
    for arch in ("sd", "sdxl"):
        label = ARCH_LABEL[arch]
        modules = [("UNet", build_unet(arch)), ("VAE", build_vae(arch))]
        modules += [(name, build_text(cfg, proj)) for name, cfg, proj in ARCHS[arch].texts]
        for name, module in modules:
            params = list(module.parameters())
            n = sum(p.numel() for p in params)
            rows.append((label, name, n, n * 4, n * 2, adamw8bit_state_bytes(params), n * 8))
    return rows


def usable_gib(gpu_gib: float) -> float:
    return USABLE_GIB.get(int(gpu_gib), gpu_gib * 0.92)


def verdict(estimate: int, gpu_gib: float) -> str:
    usable = usable_gib(gpu_gib) * GIB
    if estimate <= FITS * usable:
        return "fits"
    if estimate <= usable:
        return "tight"
    return "does not fit"


def variants(setup: Setup) -> list[tuple[str, Setup]]:
    """Settings to try when a preset does not fit: checkpointing, smaller batches, a smaller LoRA rank, and for
    full fine-tunes weights without an fp32 master copy (kohya's --full_bf16 / --full_fp16)."""
    out = []
    if not setup.gradient_checkpointing:
        out.append(("gradient_checkpointing=True", _replace(setup, gradient_checkpointing=True)))
    batch = setup.batch_size
    while batch > 1:
        batch //= 2
        out.append(
            (
                f"gradient_checkpointing=True, batch_size={batch}",
                _replace(setup, gradient_checkpointing=True, batch_size=batch),
            )
        )
    if setup.lora_rank > 4:
        out.append((f"lora_rank={setup.lora_rank // 2}", _replace(setup, lora_rank=setup.lora_rank // 2)))
    if not setup.lora_rank:
        out.append(
            (
                f"{setup.mixed_precision} weights, no fp32 master copy (not an edtools option yet)",
                _replace(setup, half_weights=True),
            )
        )
    return out


def _replace(setup: Setup, **changes) -> Setup:
    import dataclasses

    return dataclasses.replace(setup, **changes)


# The configuration EveryDream2 documents for SD1.x on a T4: full UNet + text encoder, AMP (fp16), gradient
# checkpointing, AdamW8bit, no latent cache (the VAE stays on the GPU and encodes each batch).
EVERYDREAM2_T4 = Setup(
    "sd", 512, 8, "fp16", True, train_text_encoder=True, cache_latents=False, cache_text_embeddings=False
)


def preset_task(name: str, quick: bool) -> dict:
    """Everything one preset needs: its step and caching pass, the step with checkpointing flipped, and settings
    that would fit if it does not (run in a worker process)."""
    import resource

    import torch

    from edtools.presets import PRESETS

    torch.set_num_threads(1)  # fake tensors compute nothing
    preset = PRESETS[name]
    simulated: dict[str, StepMemory] = {}

    def step_for(setup: Setup) -> StepMemory:
        key = repr(setup)
        if key not in simulated:
            simulated[key] = simulate_step(setup)
        return simulated[key]

    setup = Setup.from_preset(preset)
    out = {"step": step_for(setup)}
    out["caching"] = simulate_caching(setup, out["step"])
    if not quick:
        flipped = _replace(setup, gradient_checkpointing=not setup.gradient_checkpointing)
        out["alternative"] = step_for(flipped)
        if verdict(max(out["step"].estimate, out["caching"].estimate), preset.gpu_gib) != "fits":
            out["fixes"] = []
            for label, candidate in variants(setup):
                step = step_for(candidate)
                cache = simulate_caching(candidate, step)
                out["fixes"].append((label, step, cache))
                if verdict(max(step.estimate, cache.estimate), preset.gpu_gib) == "fits":
                    break
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def step_task(setup: Setup, attention: str = "efficient") -> StepMemory:
    import torch

    torch.set_num_threads(1)
    return simulate_step(setup, attention)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", metavar="NAME", help="only these presets")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the presets only: no cross-check, alternatives or reference runs",
    )
    parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md section")
    parser.add_argument(
        "--jobs", type=int, default=2, help="worker processes for the fake-tensor runs (1: in this process)"
    )
    parser.add_argument("--cross-check-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(1)
    if args.cross_check_child:
        print(json.dumps(cross_check_child()))
        return 0

    from edtools.presets import PRESETS

    names = args.presets or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    start = time.perf_counter()
    child = None if args.quick else start_cross_check()

    # Largest first (SDXL runs take longest), so the workers finish together.
    order = sorted(names, key=lambda n: PRESETS[n].architecture != "sdxl")
    tasks = {("preset", n): (preset_task, (n, args.quick)) for n in order}
    if not args.quick:
        tasks["reference"] = (step_task, (EVERYDREAM2_T4,))
        tasks["reference b2"] = (step_task, (_replace(EVERYDREAM2_T4, batch_size=2),))
        for checkpointing in (False, True):
            tasks[("cross-check", checkpointing)] = (
                step_task,
                (cross_check_setup(checkpointing), "cpu_flash"),
            )
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = {key: pool.submit(fn, *fn_args) for key, (fn, fn_args) in tasks.items()}
            components = component_table()
            results = {key: future.result() for key, future in futures.items()}
    else:
        components = component_table()
        results = {key: fn(*fn_args) for key, (fn, fn_args) in tasks.items()}

    per_preset = {n: results[("preset", n)] for n in names}
    steps = {n: r["step"] for n, r in per_preset.items()}
    caching = {n: r["caching"] for n, r in per_preset.items()}
    alternatives = {n: r["alternative"] for n, r in per_preset.items() if "alternative" in r}
    fixes = {n: r["fixes"] for n, r in per_preset.items() if "fixes" in r}
    reference = (results["reference b2"], results["reference"]) if "reference" in results else None
    checks = {}
    if child is not None:
        fakes = {c: results[("cross-check", c)] for c in (False, True)}
        checks = finish_cross_check(child, fakes)
    seconds = time.perf_counter() - start
    import resource

    rss = {
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.jobs > 1:
        rss["largest simulation worker"] = max(r["rss"] for r in per_preset.values())
    if checks:
        rss["cross-check child"] = checks["child_peak_rss"]
    report(
        PRESETS, names, components, steps, alternatives, caching, fixes, reference, checks, seconds, rss, args
    )
    return 0


def report(
    presets,
    names,
    components,
    steps,
    alternatives,
    caching,
    fixes,
    reference,
    checks,
    seconds,
    rss,
    args,
):
    md = args.markdown
    out = []

    def table(header, rows):
        if md:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
            out.append("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
            out.extend(
                "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
            )
        out.append("")

    def text(line=""):
        out.append(line)

    def bold(value: str) -> str:
        return f"**{value}**" if md else value

    command = "python bench/memory.py" + (" --presets " + " ".join(args.presets) if args.presets else "")
    command += " --quick" if args.quick else ""
    command += f" --jobs {args.jobs}" if args.jobs != 2 else ""
    workers = (
        f"{args.jobs} simulation worker processes" if args.jobs > 1 else "simulations in the main process"
    )
    run = f"{seconds:.0f} s wall ({workers}); peak RSS per process: " + ", ".join(
        f"{k} {v / GIB:.2f} GiB" for k, v in rss.items()
    )
    if md:
        text("## Memory per preset (estimates)")
        text()
        text(
            f"**Estimates (no GPU measurement).** `{command} --markdown` on 2026-11-25, 2-core CPU, no GPU, "
            f"`torch {__import__('torch').__version__}`, `diffusers {__import__('diffusers').__version__}`, "
            f"`transformers {__import__('transformers').__version__}`, `peft {__import__('peft').__version__}`: "
            f"{run}."
        )
    else:
        text("GPU memory per preset: ESTIMATES (no GPU measurement)")
    text()
    text(
        "Method: weights, gradients and optimizer state are exact byte counts of the real configs built on the "
        "meta device. One training step (trained text encoder, UNet forward under autocast, MSE loss, backward) "
        "runs on fake tensors (FakeTensorMode: shapes and dtypes, no data) while a dispatch mode sums the bytes "
        "of every live tensor storage; its peak covers activations saved for backward, gradients, autocast's "
        "half copies of fp32 weights, checkpoint recomputation and transient buffers. Autocast follows CUDA's "
        "rules (torch 2.13 lists: group_norm, layer_norm, softmax, upsample_nearest2d ... run in fp32), gradient "
        "checkpointing is diffusers' enable_gradient_checkpointing() (non-reentrant), attention is the "
        "memory-efficient SDPA kernel as on a GPU (flash keeps the same tensors). LoRA: peft adapters on "
        f"{', '.join(LORA_TARGETS)} (what peft creates is counted). AdamW8bit state: 2 B/param plus an fp32 "
        "absmax per 256-value block, 8 B/param for tensors under 4096 values; on the SD1.5 UNet this rule gives "
        f"{components[0][5] / components[0][2]:.3f} B/param (bench/optimizer_memory.py measured 2.034)."
    )
    text()
    text("Components (real configs, meta device; GiB):")
    text()
    rows = [
        (a, n, f"{c:,}", gib(f32), gib(f16), gib(s8), gib(s32)) for a, n, c, f32, f16, s8, s32 in components
    ]
    table(["model", "component", "parameters", "fp32", "fp16/bf16", "AdamW8bit state", "AdamW state"], rows)

    text(
        "Activation memory of one training step, with and without gradient checkpointing (GiB, fake tensors):"
    )
    text()
    rows = []
    for name in names:
        for step in (steps[name], alternatives.get(name)):
            if step is not None:
                rows.append(
                    (
                        name if step is steps[name] else f"({name}, other checkpointing)",
                        step.setup.describe(),
                        gib(step.saved_for_backward),
                        gib(step.held_after_forward),
                        gib(step.grads),
                        gib(step.step_peak),
                        f"{step.seconds:.1f}",
                    )
                )
    table(
        [
            "preset",
            "step",
            "saved for backward (hooks)",
            "held after forward",
            "gradients",
            "step peak",
            "sim s",
        ],
        rows,
    )
    text(
        "saved for backward: saved-tensor hook sum, each storage once, parameters excluded (n/a with "
        "checkpointing, whose own hooks take over). held after forward: every tensor still alive when the "
        "forward ends (adds checkpoint inputs and the output). step peak: highest live total over forward + "
        "backward above the resident weights, gradients included (with fp32 weights the peak is at the end of "
        "backward, when every gradient exists)."
    )
    text()

    if checks:
        text(
            f"Cross-check with real tensors on the CPU: SD1.5 UNet, random weights, fp32, LoRA "
            f"r{CROSS_CHECK['lora_rank']}, {CROSS_CHECK['resolution']} px, batch {CROSS_CHECK['batch_size']}, CPU "
            "flash attention in both runs; measured = rise of the process's peak RSS over one step after a "
            "warm-up step (MiB):"
        )
        text()
        rows = []
        for mode in ("off", "on"):
            c = checks[mode]

            def measured(key, c=c):
                if c[key] is None:
                    return "n/a"
                ratio = c[key] / c["fake_step_peak"]
                return f"{c[key] / 2**20:.0f} ({bold(f'{ratio:.2f}')})"

            rows.append(
                (
                    mode,
                    f"{c['fake_step_peak'] / 2**20:.0f}",
                    f"{c['real_tracker_peak'] / 2**20:.0f}",
                    measured("peak_rss_rise_no_onednn"),
                    measured("peak_rss_rise"),
                    f"{c['fake_held'] / 2**20:.0f}",
                    f"{c['rss_rise_after_forward'] / 2**20:.0f}",
                    "n/a" if c["saved_for_backward"] is None else f"{c['saved_for_backward'] / 2**20:.0f}",
                )
            )
        table(
            [
                "checkpointing",
                "predicted peak (fake tensors)",
                "same tracker, real tensors",
                "measured peak RSS rise, oneDNN conv off (/ predicted)",
                "measured, oneDNN conv on (/ predicted)",
                "predicted held after forward",
                "measured RSS rise after forward",
                "saved for backward (hooks, real)",
            ],
            rows,
        )
        text(
            "The tracker gives the same bytes on fake and real tensors, and the measured RSS matches it when "
            "torch's own conv kernels run. With oneDNN convolutions the RSS also holds oneDNN's buffers (a "
            "blocked-layout copy of a conv weight per call; the largest SD1.5 conv weight is "
            f"{checks['largest_conv_weight'] / 2**20:.0f} MiB), which the tracker cannot see: they show under "
            "checkpointing, where the step's tensor peak is small. On a GPU the matching extras (cuDNN / cuBLAS "
            "workspaces, allocator blocks) are what the allowance below is for."
        )
        text()

    usable = ", ".join(f"{k} GB: {v} GiB" for k, v in USABLE_GIB.items())
    text(
        f"Per preset (GiB). Estimated peak = weights + optimizer state + step peak + allowance ({CONTEXT_GIB:.1f} "
        f"GiB CUDA context and workspaces + {FRAGMENTATION:.0%} of the tensor total for the caching allocator). "
        "Caching pass: UNet (as trained, no gradients or optimizer state yet), VAE and text encoders resident, "
        "one VAE encode of a batch at the preset's resolution (SDXL's VAE in fp32: force_upcast), frozen text "
        f"encoders encode one batch, same allowance. Usable memory ({usable}); verdict on the larger of the two "
        f"peaks: fits <= {FITS * 100:.0f} % of usable, tight <= 100 %, else does not fit."
    )
    text()
    rows = []
    for name in names:
        s, c, p = steps[name], caching[name], presets[name]
        rows.append(
            (
                name,
                s.setup.describe(),
                " + ".join(f"{k} {gib(v)}" for k, v in s.weights.items()),
                f"{s.trainable_params / 1e6:,.1f} M",
                gib(s.optimizer),
                gib(s.step_peak),
                gib(s.allowance),
                bold(gib(s.estimate)),
                f"{gib(c.estimate)} (VAE encode {gib(c.vae_transient)})",
                f"{p.gpu_gib:g} ({usable_gib(p.gpu_gib):.1f})",
                bold(verdict(max(s.estimate, c.estimate), p.gpu_gib)),
            )
        )
    table(
        [
            "preset",
            "settings",
            "weights",
            "trained params",
            "optimizer",
            "step peak",
            "allowance",
            "estimated peak",
            "caching-pass peak",
            "GPU GB (usable GiB)",
            "verdict (estimate)",
        ],
        rows,
    )

    if fixes:
        text("Presets that do not fit or are tight: settings that would (estimates, tried in this order):")
        text()
        rows = []
        for name, tried in fixes.items():
            for label, s, c in tried:
                rows.append(
                    (
                        name,
                        label,
                        gib(s.estimate),
                        gib(c.estimate),
                        verdict(max(s.estimate, c.estimate), presets[name].gpu_gib),
                    )
                )
        table(["preset", "change", "estimated peak", "caching-pass peak", "verdict (estimate)"], rows)

    text(
        "Design constraint (not measured): saving a checkpoint copies tensors to the CPU one at a time, so it "
        "never raises the step's peak."
    )
    text()
    text(
        "Not modelled: EMA weights, sample images during training, torch.compile, xformers, several GPUs; how "
        "much of the allowance a real GPU needs (cuDNN's workspace choice, fragmentation) is the main unknown "
        "until bench/gpu_step.py runs on one."
    )
    text()
    text("Reference points (published, not measured here):")
    text()
    ed2 = ""
    if reference:
        small, big = reference
        per_image = (big.estimate - small.estimate) / (big.setup.batch_size - small.setup.batch_size)
        ed2 = (
            " This script's estimate for that setup (SD1.5 full + text encoder, 512 px, fp16, checkpointing, "
            f"AdamW8bit, VAE on the GPU): batch 8 {gib(big.estimate)} GiB ({verdict(big.estimate, 16)} on a "
            f"T4), batch 2 {gib(small.estimate)} GiB, {per_image / GIB:.2f} GiB per extra image."
        )
    for line in (
        "EveryDream2 trains SD1.x fully (UNet + text encoder) at batch 8 on a 16 GB T4 with AMP, gradient "
        "checkpointing and AdamW8bit; its docs put such runs on 12 GB GPUs at batch 1-2 and one more image "
        "per batch at about 0.5-1 GB." + ed2,
        "kohya's sd-scripts train SDXL LoRA in about 8-10 GB (kohya-ss/sd-scripts#715: about 7 GB at batch 1 on "
        "a 16 GB card, but out of memory in save_state with an old accelerate).",
        "diffusers#4872: the SDXL LoRA example (1024 px, batch 1, fp16, 8-bit Adam, gradient checkpointing, a "
        "checkpoint every 10 steps) ran out of memory on a Colab T4 (14.75 GiB total, 13.2 GiB allocated); the "
        "maintainer's answer was to turn checkpoint saving off.",
    ):
        text(("- " if md else "  - ") + line)
    text()
    if not md:
        text(f"Run: {run}")
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
