"""A kernel's identity, in one object shared by its runtime wrapper and the tuner.

A :class:`KernelDescriptor` says, for one Triton kernel: its name, the table key of a call
(from the call's arguments, never its data), the default config, the config to use (the
tables', else the default), how to compile a config without launching it, and its search-space
file. The runtime wrapper and the tuner both ask the descriptor, so a tuned entry is always
written under the key the runtime looks up.

A *call* is a small frozen dataclass of everything about a call that is not tensor data:
shapes, dtype, which optional tensors are given, options. Each kernel defines its own (it
needs a ``dtype`` attribute); :class:`RowsCall` serves kernels over independent rows.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import torch

from ._common import dtype_name
from .config import LaunchConfig
from .device import device_name
from .table import TableEntry, lookup_config


class Call(Protocol):
    """What every call dataclass has."""

    dtype: torch.dtype


CallT = TypeVar("CallT", bound=Call)


class TableKey(NamedTuple):
    """A call's coordinates in the lookup tables, besides kernel, device and dtype (a tuple:
    built on every kernel call)."""

    width: int
    rows: int
    variant: str = ""


class KernelDescriptor(abc.ABC, Generic[CallT]):
    """One kernel's identity: name, table key, default config, selection, compilation.

    Subclasses set :attr:`name` and implement :meth:`call_for_shape`, :meth:`table_key` and
    :meth:`default_config`; :meth:`shape_for_call` (the table-miss log) and :meth:`compile`
    are optional. A kernel's launcher is its own method, ``launch``, with the kernel's
    arguments.
    """

    #: the kernel's name: ``python -m tuner --kernel`` and the table-miss log use it
    name: str
    #: the kernel's name in lookup tables; empty: :attr:`name` (variants of one kernel share it)
    table_kernel: str = ""

    @property
    def table_name(self) -> str:
        """The name the kernel's entries carry in lookup tables."""
        return self.table_kernel or self.name

    @property
    def space_file(self) -> str | os.PathLike:
        """The search-space YAML: a file name in the tuner's ``search_spaces/``, or a path."""
        return f"{self.name}.yaml"

    @abc.abstractmethod
    def call_for_shape(self, shape: tuple[int, ...], dtype: torch.dtype) -> CallT:
        """The call a tuner problem of this shape (``--shape``, as dims) and dtype measures;
        a ValueError for a shape the kernel does not take."""

    def shape_for_call(self, call: CallT) -> tuple[int, ...] | None:
        """The tuner shape whose problem has this call's table key (the inverse of
        :meth:`call_for_shape`), or None for calls the tuner does not cover."""
        return None

    @abc.abstractmethod
    def table_key(self, call: CallT) -> TableKey:
        """Where the call's config lives in the lookup tables."""

    @abc.abstractmethod
    def default_config(self, call: CallT, device: str | None = None) -> LaunchConfig:
        """The config used where no table has an entry, for the GPU model ``device`` (None:
        the current one)."""

    def select(self, call: CallT, device: str | None = None) -> tuple[LaunchConfig, str]:
        """The config for a call on the GPU model ``device`` (None: the current one) and where
        it came from: ``"table"``, ``"table (nearest: rows=...)"`` or ``"heuristic"``.

        The tables' exact entry, else their nearest row count for the same other keys, else
        :meth:`default_config`; a miss is logged for the tuner (:mod:`kernels.misses`).
        """
        device = device if device is not None else device_name()
        key = self.table_key(call)
        return lookup_config(self.table_name, device, dtype_name(call.dtype), key.width, key.rows,
                             variant=key.variant,
                             heuristic=lambda: self.default_config(call, device),
                             miss=lambda: self._miss(call))

    def _miss(self, call: CallT) -> tuple[str, str] | None:
        shape = self.shape_for_call(call)
        return None if shape is None else (self.name, "x".join(map(str, shape)))

    def compile(self, call: CallT, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """Compiles the kernel the call runs with ``config`` into Triton's cache without
        launching it (ahead of timing, or at start-up), on stand-in tensors on ``device``: the
        tuner's compile processes pass ``"cpu"`` and compile for their worker's GPU without a
        CUDA context (:func:`kernels.targets.compile_only_for`). The default does nothing: the
        first launch compiles."""

    def table_entry(self, call: CallT, device: str, config: LaunchConfig,
                    **provenance: Any) -> TableEntry:
        """The table entry that makes ``select`` return ``config`` for the call on ``device``;
        ``provenance`` fills the entry's other fields (ms, gbps, trials, versions, date)."""
        key = self.table_key(call)
        return TableEntry(kernel=self.table_name, device=device, dtype=dtype_name(call.dtype),
                          width=key.width, rows=key.rows, variant=key.variant, config=config,
                          **provenance)


@dataclasses.dataclass(frozen=True)
class RowsCall:
    """A call on ``rows`` independent rows of ``width`` elements."""

    rows: int
    width: int
    dtype: torch.dtype


RowsCallT = TypeVar("RowsCallT", bound=RowsCall)


class RowsDescriptor(KernelDescriptor[RowsCallT]):
    """A kernel over independent rows: keyed by width and row count, and a tuner shape is
    ROWSxWIDTH or a full tensor shape normalised over its last dim."""

    def call_for_shape(self, shape: tuple[int, ...], dtype: torch.dtype) -> RowsCallT:
        return self.make_call(math.prod(shape[:-1]), shape[-1], dtype)

    def make_call(self, rows: int, width: int, dtype: torch.dtype) -> RowsCallT:
        """The call a tuner problem of ``rows`` rows measures."""
        return RowsCall(rows, width, dtype)

    def shape_for_call(self, call: RowsCallT) -> tuple[int, ...]:
        return (call.rows, call.width)

    def table_key(self, call: RowsCallT) -> TableKey:
        return TableKey(width=call.width, rows=call.rows)
