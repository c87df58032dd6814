"""Kernels from other packages: ``module:attribute`` references and the ``tuner.kernels``
entry-point group.

A reference names a :class:`~tuner.problems.KernelSpec` subclass (instantiated with no
arguments) or instance, e.g. ``my_pkg.my_module:MyKernel``, whose ``descriptor`` is the
kernel's :class:`~kernels.KernelDescriptor`, as for the built-in kernels. An installed package
registers a kernel by name in its ``pyproject.toml``::

    [project.entry-points."tuner.kernels"]
    my_kernel = "my_pkg.my_module:MyKernel"

A resolved kernel is registered under the name it was looked up by (the reference or the entry
point's name): problems, study names and the messages sent to Ray workers carry that name, so
every process can import the kernel again. Its table entries keep the descriptor's
``table_name``, under which its runtime's ``descriptor.select`` looks them up.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import re

from kernels import KernelDescriptor

from .errors import InputError
from .problems.base import KernelSpec

ENTRY_POINT_GROUP = "tuner.kernels"
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_resolved: dict[str, KernelSpec] = {}


class PluginError(InputError):
    """A kernel reference or entry point that does not lead to a KernelSpec."""


def is_reference(name: str) -> bool:
    """True for a ``module:attribute`` reference."""
    return ":" in name


def _check_descriptor(descriptor: object, where: str) -> None:
    if not isinstance(descriptor, KernelDescriptor):
        raise PluginError(f"{where}: the KernelSpec's `descriptor` is a "
                          f"{type(descriptor).__name__}, expected a kernels.KernelDescriptor "
                          "(the kernel's name, table key, default config, ...)")
    if not isinstance(getattr(descriptor, "name", None), str) or not descriptor.name:
        raise PluginError(f"{where}: the kernel's descriptor has no name; set the class "
                          "attribute `name` to the kernel's name")


def _instantiate(target: object, where: str) -> KernelSpec:
    if isinstance(target, type) and issubclass(target, KernelSpec):
        _check_descriptor(getattr(target, "descriptor", None), where)
        try:
            target = target()
        except TypeError as error:
            raise PluginError(f"{where}: cannot instantiate {target.__name__} without "
                              f"arguments: {error}") from None
    if not isinstance(target, KernelSpec):
        raise PluginError(f"{where} is a {type(target).__name__}, expected a tuner.KernelSpec "
                          "subclass or instance")
    _check_descriptor(target.descriptor, where)
    return target


def _load_reference(reference: str) -> object:
    if not _REFERENCE.match(reference):
        raise PluginError(f"bad kernel reference {reference!r}: expected module:attribute, "
                          "such as my_pkg.my_module:MyKernel")
    module_name, attribute = reference.split(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise PluginError(f"kernel {reference!r}: cannot import {module_name}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PluginError(f"kernel {reference!r}: {module_name} has no attribute {attribute}")
        target = getattr(target, part)
    return target


def entry_point_names() -> list[str]:
    """The kernel names installed packages register in the ``tuner.kernels`` group."""
    return sorted({entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def _load_entry_point(name: str) -> object | None:
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            return entry.load()
        except Exception as error:  # a broken plugin must name itself, whatever it raised
            raise PluginError(f"kernel {name!r}: entry point {entry.value} of group "
                              f"{ENTRY_POINT_GROUP} failed to load: {type(error).__name__}: "
                              f"{error}") from None
    return None


def resolve_plugin(name: str) -> KernelSpec | None:
    """The kernel a reference or an entry-point name leads to, registered under ``name``;
    None when ``name`` is neither."""
    if name in _resolved:
        return _resolved[name]
    if is_reference(name):
        target, where = _load_reference(name), f"kernel {name!r}"
    else:
        target, where = _load_entry_point(name), f"kernel {name!r} (entry point)"
        if target is None:
            return None
    spec = _instantiate(target, where)
    registered = copy.copy(spec)  # the user's object keeps its own name
    registered.name = name
    _resolved[name] = registered
    return registered
