"""What tuning adds to a kernel's descriptor: how to build, check, run and count a problem."""

from __future__ import annotations

import abc
import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar

import torch

from kernels import KernelDescriptor, LaunchConfig, TableKey

from ..errors import InputError

SEARCH_SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
_SHAPE = re.compile(r"^\d+(x\d+)+$")
# Elements of x per slice when computing a reference (see KernelSpec.reference).
REFERENCE_SLICE_ELEMENTS = 1 << 24


def parse_dtype(text: str) -> torch.dtype:
    """``"bfloat16"`` -> torch.bfloat16; anything else is an InputError listing the choices."""
    name = text.strip().removeprefix("torch.")
    if name not in DTYPES:
        raise InputError(f"unknown dtype {text!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_dims(text: str) -> tuple[int, ...]:
    """``"32x64x32"`` -> (32, 64, 32); at least two positive dims separated by ``x``."""
    cleaned = str(text).strip().lower().replace(" ", "")
    forms = ("expected positive integers joined by 'x', such as 128x64 (ROWSxWIDTH) or "
             "32x64x32x64x64 (a full tensor shape)")
    if not _SHAPE.match(cleaned):
        raise InputError(f"bad shape {text!r}: {forms}")
    dims = tuple(int(part) for part in cleaned.split("x"))
    if any(dim < 1 for dim in dims):
        raise InputError(f"bad shape {text!r}: every dim must be >= 1; {forms}")
    return dims


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing to tune: a kernel at one input shape and dtype."""

    kernel: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))

    def __str__(self) -> str:
        return f"{self.kernel} {self.shape_text} {self.dtype}"


class KernelSpec(abc.ABC):
    """What tuning adds to a kernel's :class:`~kernels.KernelDescriptor`: random inputs, the
    exact result, PyTorch's eager baseline, the bytes the kernel must move and the tolerance.

    The kernel's identity (name, table key, default config, compilation, search space) is
    the descriptor's, which its runtime wrapper uses too. Subclasses set :attr:`descriptor`
    and say how to build inputs, run a config, compute the reference and count bytes.
    """

    #: the kernel's descriptor, shared with its runtime wrapper
    descriptor: ClassVar[KernelDescriptor]
    #: the inputs split along dim 0 with x when the reference is computed in slices
    sliced_inputs: tuple[str, ...] = ("x",)
    #: relative tolerance on ||out - ref|| / ||ref|| per dtype
    tolerance: dict[str, float] = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}

    def __init__(self) -> None:
        #: the name problems carry: the descriptor's, or the reference a plugin was found by
        self.name: str = self.descriptor.name

    @property
    def table_name(self) -> str:
        return self.descriptor.table_name

    @property
    def space_file(self) -> Path:
        return SEARCH_SPACES_DIR / self.descriptor.space_file

    def problem(self, shape: str | tuple[int, ...], dtype: str) -> Problem:
        """A validated, canonical problem from a shape string (or dims) and a dtype name."""
        dims = parse_dims(shape) if isinstance(shape, str) else tuple(shape)
        torch_dtype = parse_dtype(dtype)
        try:
            self.descriptor.call_for_shape(dims, torch_dtype)  # the kernel takes the shape
        except ValueError as error:
            raise InputError(str(error)) from None
        return Problem(self.name, self.canonical_shape(dims), str(torch_dtype)[6:])

    def canonical_shape(self, dims: tuple[int, ...]) -> tuple[int, ...]:
        """The shape that names the problem (problems that tune alike may share one)."""
        return dims

    def call(self, problem: Problem) -> Any:
        """The kernel call the problem measures (the descriptor's call dataclass)."""
        return self.descriptor.call_for_shape(problem.shape, DTYPES[problem.dtype])

    def table_key(self, problem: Problem) -> TableKey:
        """Where the problem's winner goes in the lookup table."""
        return self.descriptor.table_key(self.call(problem))

    def heuristic(self, problem: Problem, device: str | None = None) -> LaunchConfig:
        """The runtime's default config for the problem on the GPU model ``device``."""
        return self.descriptor.default_config(self.call(problem), device)

    def compile(self, problem: Problem, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """Compiles ``config`` for the problem into Triton's cache without launching it, so a
        worker can compile upcoming trials in other processes while it times the current one
        (there on ``device="cpu"`` stand-ins, for the worker's GPU target:
        :func:`kernels.targets.compile_only_for`)."""
        self.descriptor.compile(self.call(problem), config, device)

    @abc.abstractmethod
    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> dict[str, Any]:
        """Fresh random inputs (never zeros) on ``device``."""

    @abc.abstractmethod
    def run(self, inputs: dict[str, Any], config: LaunchConfig | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel with ``config`` (None: the runtime's own choice)."""

    def reference(self, inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """The exact result computed by PyTorch in ``dtype`` (float64 or float32).

        Computed over slices along dim 0 of ``inputs["x"]`` (and the other
        :attr:`sliced_inputs`), so that PyTorch's temporaries stay small next to a problem that
        fills most of a 24 GB card.
        """
        x = inputs["x"]
        step = max(1, REFERENCE_SLICE_ELEMENTS // max(1, x[0].numel()))
        out = None
        for start in range(0, x.shape[0], step):
            part = self.reference_slice(
                {**inputs, **{name: inputs[name][start:start + step] for name in self.sliced_inputs}},
                dtype)
            if out is None:
                out = torch.empty((x.shape[0],) + tuple(part.shape[1:]), dtype=dtype, device=x.device)
            out[start:start + part.shape[0]] = part
        return out

    @abc.abstractmethod
    def reference_slice(self, inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """The exact result in ``dtype`` for inputs whose x is a slice along dim 0 (every
        kernel's rows, or planes, along dim 0 are independent)."""

    @abc.abstractmethod
    def eager(self, inputs: dict[str, Any]) -> torch.Tensor:
        """PyTorch eager, the baseline a user would otherwise run."""

    @abc.abstractmethod
    def output_like(self, inputs: dict[str, Any]) -> torch.Tensor:
        """An uninitialised output buffer of the right shape, dtype and device."""

    @abc.abstractmethod
    def bytes_moved(self, problem: Problem) -> int:
        """The fewest bytes the kernel must read and write (each input once, output once)."""
