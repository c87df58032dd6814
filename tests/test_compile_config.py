"""A descriptor's ``compile`` compiles exactly what a launch of the same call runs: same
kernel, grid, scalar arguments, constexprs, options and pointer dtypes, so the launch that
follows hits Triton's cache. The backward kernels run a persistent grid sized after compiling:
there, grid and the arguments marked ``do_not_specialize`` (not in Triton's cache key) may
differ."""

import pytest
import torch

import kernels.add_layernorm as add_layernorm
import kernels.add_layernorm_pool_gelu as tail
from kernels import (
    ADD_LAYERNORM,
    ADD_LAYERNORM_BACKWARD,
    ADD_LAYERNORM_POOL_GELU,
    ADD_LAYERNORM_POOL_GELU_BACKWARD,
    ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST,
    ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST,
    CONV_TRANSPOSE_TAIL,
    AddLayerNormBackwardCall,
    AddLayerNormCall,
    ConvTailCall,
    LaunchConfig,
    PoolGeluCall,
)


class Recorder:
    """Stands in for a @triton.jit kernel: records launches and warm-ups alike."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def _record(self, grid, args, meta):
        summary = tuple(("tensor", a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        self.calls.append((self.name, tuple(grid), summary, tuple(sorted(meta.items()))))

    def __getitem__(self, grid):
        return lambda *args, **meta: self._record(grid, args, meta)

    def warmup(self, *args, grid, **meta):
        self._record(grid, args, meta)


# The backward kernels' arguments marked do_not_specialize.
UNSPECIALISED = ("partial_stride", "tiles_per_program")


def cache_key(call, kernel):
    """A recorded call without what Triton's cache key leaves out: the grid and the arguments
    the backward kernels do not specialise on."""
    unspecialised = {kernel.arg_names.index(name) for name in UNSPECIALISED}
    name, _, summary, meta = call
    return name, tuple(None if index in unspecialised else arg
                       for index, arg in enumerate(summary)), meta


@pytest.fixture
def calls(monkeypatch):
    recorded = []
    for module, name in ((add_layernorm, "_add_layernorm_kernel"),
                         (tail, "_add_layernorm_pool_gelu_kernel"),
                         (tail, "_add_layernorm_pool_gelu_cl_kernel")):
        monkeypatch.setattr(module, name, Recorder(name, recorded))
    return recorded


def compiling(monkeypatch, module=None):
    """compile is a no-op under the interpreter; pretend to be on a GPU for it."""
    for patched in (module,) if module is not None else (add_layernorm, tail):
        monkeypatch.setattr(patched, "interpreter_enabled", lambda: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,config", [
    (48, 64, LaunchConfig(16, 64, 4, 1, "evict_last")),
    (5, 300, LaunchConfig(2, 128, 4, 2, "evict_first")),
])
def test_add_layernorm_compile_matches_launch(calls, monkeypatch, dtype, rows, width, config):
    x = torch.randn(rows, width, dtype=dtype)
    weight, bias = torch.randn(width, dtype=dtype), torch.randn(width, dtype=dtype)
    add_layernorm.fused_add_layernorm(x, torch.tensor(1.0, dtype=dtype), width, weight, bias,
                                      config=config)
    compiling(monkeypatch)
    ADD_LAYERNORM.compile(AddLayerNormCall(rows, width, dtype, sum_weight_dtype=dtype), config,
                          device="cpu")
    launched, compiled = calls
    assert launched == compiled


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,pool,config", [
    ((2, 3, 4, 6, 8), (2, 2, 2), LaunchConfig(2, 8, 2, 1, "evict_last")),
    ((1, 4, 5, 7, 9), (1, 1, 3), LaunchConfig(1, 16, 1)),
])
def test_tail_compile_matches_launch(calls, monkeypatch, channels_last, shape, pool, config):
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=torch.bfloat16).contiguous(memory_format=layout)
    weight, bias = torch.randn(shape[-1], dtype=torch.bfloat16), torch.randn(shape[-1], dtype=torch.bfloat16)
    tail.fused_add_layernorm_pool_gelu(x, 0.5, weight, bias, 1e-5, pool, "tanh", config=config)
    compiling(monkeypatch)
    descriptor = ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST if channels_last else ADD_LAYERNORM_POOL_GELU
    descriptor.compile(PoolGeluCall(shape, torch.bfloat16, pool, "tanh"), config, device="cpu")
    launched, compiled = calls
    assert launched[0] == ("_add_layernorm_pool_gelu_cl_kernel" if channels_last
                           else "_add_layernorm_pool_gelu_kernel")
    # The Python-number sum_weight is passed by value, so its value differs (0.5 vs 0.0);
    # values of float arguments are not part of Triton's cache key. Everything else is equal.
    assert launched[:2] == compiled[:2] and launched[3] == compiled[3]
    assert [a for i, a in enumerate(launched[2]) if i != 5] == \
        [a for i, a in enumerate(compiled[2]) if i != 5]


@pytest.mark.parametrize("rows,width,config", [
    (300, 64, LaunchConfig(16, 64, 4, 2, "evict_first")),
    (5, 300, LaunchConfig(1, 128, 2)),  # chunked
])
def test_backward_compile_matches_launch(monkeypatch, rows, width, config):
    import kernels.add_layernorm_backward as backward

    recorded, kernel = [], backward._add_layernorm_backward_kernel
    monkeypatch.setattr(backward, "_add_layernorm_backward_kernel",
                        Recorder("_add_layernorm_backward_kernel", recorded))
    dtype = torch.bfloat16
    x, dy = torch.randn(rows, width, dtype=dtype), torch.randn(rows, width, dtype=dtype)
    stats = torch.randn(rows)
    backward.add_layernorm_backward(dy, x, torch.randn(width, dtype=dtype), stats, stats,
                                    torch.tensor(1.0, dtype=dtype), config=config)
    compiling(monkeypatch, backward)
    ADD_LAYERNORM_BACKWARD.compile(AddLayerNormBackwardCall(rows, width, dtype,
                                                            sum_weight_dtype=dtype),
                                   config, device="cpu")
    launched, compiled = recorded
    assert cache_key(launched, kernel) == cache_key(compiled, kernel)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tail_backward_compile_matches_launch(monkeypatch, channels_last):
    import kernels.add_layernorm_pool_gelu_backward as tail_backward

    recorded, kernels = [], {}
    for name in ("_add_layernorm_pool_gelu_backward_kernel",
                 "_add_layernorm_pool_gelu_backward_cl_kernel"):
        kernels[name] = getattr(tail_backward, name)
        monkeypatch.setattr(tail_backward, name, Recorder(name, recorded))
    shape, pool, config = (2, 3, 5, 6, 8), (2, 2, 2), LaunchConfig(2, 8, 2, 2, "evict_last")
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    dtype = torch.bfloat16
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout)
    dy = torch.randn((2, 3, 2, 3, 4), dtype=dtype).contiguous(memory_format=layout)
    stats = torch.randn(2 * 3 * 5 * 6)
    tail_backward.add_layernorm_pool_gelu_backward(
        dy, x, torch.randn(8, dtype=dtype), torch.randn(8, dtype=dtype), stats, stats,
        torch.tensor(1.0, dtype=dtype), pool, "tanh", config, channels_last=channels_last)
    compiling(monkeypatch, tail_backward)
    descriptor = ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST if channels_last \
        else ADD_LAYERNORM_POOL_GELU_BACKWARD
    descriptor.compile(PoolGeluCall(shape, dtype, pool, "tanh", sum_weight_dtype=dtype), config,
                       device="cpu")
    launched, compiled = recorded
    assert launched[0].endswith("_cl_kernel") == channels_last
    kernel = kernels[launched[0]]
    assert cache_key(launched, kernel) == cache_key(compiled, kernel)


@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_tail_compile_matches_launch(monkeypatch, with_bias):
    import kernels.conv_transpose_tail as conv_tail

    recorded = []
    monkeypatch.setattr(conv_tail, "_conv_transpose_tail_kernel",
                        Recorder("_conv_transpose_tail_kernel", recorded))
    x_shape, c_out, config = (2, 3, 2, 5, 4), 16, LaunchConfig(16, 16, 2, 1, "evict_first")
    x, weight = torch.randn(x_shape), torch.randn(3, c_out, 3, 3, 3)
    bias = torch.randn(c_out) if with_bias else None
    with torch.no_grad():
        conv_tail.fused_conv_transpose_tail(x, weight, bias, torch.tensor(0.5), torch.randn(8),
                                            None, config=config)
    compiling(monkeypatch, conv_tail)
    CONV_TRANSPOSE_TAIL.compile(ConvTailCall(x_shape, c_out, torch.float32, "none", with_bias,
                                             True, False, torch.float32), config, device="cpu")
    launched, compiled = recorded
    assert launched == compiled
