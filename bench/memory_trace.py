"""The traced step's machinery: fake tensors, CUDA's autocast rules on the CPU, GPU attention, live bytes.

A step run inside these on fake tensors computes nothing, yet every op runs at its real size and dtype.
"""

from __future__ import annotations

import contextlib
import weakref

__all__ = [
    "CUDA_FP32_OPS",
    "CUDA_FP32_SET_OPT_DTYPE_OPS",
    "cuda_autocast_rules",
    "gpu_attention",
    "live_tracker_class",
    "saved_tensor_bytes",
    "tensors_of",
    "to_fake",
]


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


def live_tracker_class():
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
