"""Problems (tuner.problems): shapes and dtypes from the command line, canonical shapes and
kernels by name; each bad input a clear InputError listing what is accepted."""

from __future__ import annotations

import pytest
import torch

from tuner import InputError
from tuner.problems import TableKey, get_kernel, parse_dims, parse_dtype


def test_parse_dims_and_dtype():
    assert parse_dims("128x64") == (128, 64)
    assert parse_dims(" 32X64x32 ") == (32, 64, 32)
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("float32") is torch.float32


def test_full_shape_is_canonicalised():
    spec = get_kernel("add_layernorm")
    problem = spec.problem("32x64x32x64x64", "bfloat16")
    assert problem.shape == (4194304, 64)
    assert problem.dtype == "bfloat16"
    assert problem.kernel == "add_layernorm"
    assert problem.shape_text == "4194304x64"
    assert spec.problem("4194304x64", "torch.bfloat16") == problem
    assert spec.table_key(problem) == TableKey(width=64, rows=4194304)


@pytest.mark.parametrize("text", ["128", "128x", "axb", "-1x64", "", "x64", "128x64x", "1.5x64"])
def test_bad_shape_lists_accepted_forms(text):
    with pytest.raises(InputError, match=r"bad shape .*expected positive integers joined by 'x', "
                                         r"such as 128x64 .*32x64x32x64x64"):
        parse_dims(text)


@pytest.mark.parametrize("text", ["0x64", "128x0", "4x0x64"])
def test_zero_dims_are_rejected(text):
    with pytest.raises(InputError, match=rf"bad shape '{text}': every dim must be >= 1; "
                                         r"expected positive integers joined by 'x'"):
        parse_dims(text)


@pytest.mark.parametrize("text", ["float64", "int8", "fp16", ""])
def test_bad_dtype_lists_accepted(text):
    with pytest.raises(InputError, match=rf"unknown dtype '{text}'; accepted: float32, float16, bfloat16"):
        parse_dtype(text)
    with pytest.raises(InputError, match="unknown dtype"):
        get_kernel("add_layernorm").problem("128x64", text)


def test_unknown_kernel():
    with pytest.raises(InputError, match=r"unknown kernel 'softmax'; known kernels: add_layernorm"):
        get_kernel("softmax")
