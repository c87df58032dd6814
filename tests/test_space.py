"""Search spaces (tuner.space): the shipped YAML files, the knob rules and restrictions, and bad
space files, each a clear error naming the file and the key."""

from __future__ import annotations

import textwrap

import pytest
import torch
import triton

from kernels import LaunchConfig, TableKey
from tuner import InputError
from tuner.problems import get_kernel
from tuner.space import PARAMETERS, SearchSpace, SpaceError, load_space, parse_space

SPACE = get_kernel("add_layernorm").space_file

GOOD_SPACE = """\
kernel: add_layernorm
parameters:
  block_rows: [1, 2, 4]
  block_w: {relative_to_width: {min: 16, max: 65536, max_chunks: 2}}
  num_warps: [1, 2, 4]
  num_stages: [1, 2]
  eviction_policy: ["", evict_first]
restrictions:
  max_tile_elements: 16384
  stages_only_when_chunked: true
"""


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


# -- the shipped search space ------------------------------------------------------------------
def test_shipped_space_loads():
    space = load_space(SPACE)
    assert isinstance(space, SearchSpace)
    assert space.kernel == "add_layernorm"
    assert set(space.parameters) == set(PARAMETERS)
    assert space.path == str(SPACE)


@pytest.mark.parametrize("rows,width", [(128, 64), (1, 64), (4096, 20), (4, 1), (1024, 768),
                                        (64, 20000), (8, 100000)])
def test_shipped_space_candidates_satisfy_restrictions(rows, width):
    space = load_space(SPACE)
    key = TableKey(width=width, rows=rows)
    candidates = space.candidates(key)
    assert candidates
    assert len({config.key() for config in candidates}) == len(candidates)
    choices = space.choices(key)
    for config in candidates:
        assert space.allows(config, key)
        for name in PARAMETERS:
            assert getattr(config, name) in choices[name]
        assert config.tile_elements <= 65536
        assert 1 <= config.tile_elements // (32 * config.num_warps) or config.num_warps == 1
        assert config.tile_elements <= 64 * 32 * config.num_warps
        assert config.block_rows <= triton.next_power_of_2(rows)
        assert config.num_stages == 1 or config.block_w < width


@pytest.mark.parametrize("width,values,kept", [
    (64, [16, 32, 64], {64}),      # powers of two down to a sixteenth, min 16; no small chunks
    (100, [16, 32, 64, 128], {128}),  # rounded up to the next power of two
    (16, [16], {16}),              # min 16: no 8-wide chunks
    (8, [8], {8}),                 # narrower than min: the row itself
    (1, [1], {1}),
    (20000, [2048, 4096, 8192, 16384, 32768], {4096, 8192, 16384, 32768}),
])
def test_block_w_relative_to_width(width, values, kept):
    space = load_space(SPACE)
    assert space.values("block_w", TableKey(width=width, rows=128)) == values
    assert {config.block_w for config in space.candidates(TableKey(width=width, rows=128))} == kept


def test_block_w_clamped_to_max_for_wide_rows():
    space = load_space(SPACE)
    values = space.values("block_w", TableKey(width=100000, rows=128))
    assert values[-1] == 65536 and all(16 <= value <= 65536 for value in values)


def test_block_w_rule_stays_within_min_and_max(tmp_path):
    space = load_space(write(tmp_path, edit(edit(GOOD_SPACE, "max_chunks: 2", "max_chunks: 8"),
                                            "max: 65536", "max: 256")))
    assert space.values("block_w", TableKey(width=64, rows=8)) == [16, 32, 64]
    assert space.values("block_w", TableKey(width=8, rows=8)) == [8]
    for width in (1000, 5000):  # wider than max: clamped
        values = space.values("block_w", TableKey(width=width, rows=8))
        assert values[-1] == 256 and all(16 <= value <= 256 for value in values)


def test_restrictions_prune_candidates(tmp_path):
    space = load_space(write(tmp_path, GOOD_SPACE))
    key = TableKey(width=64, rows=1024)
    candidates = space.candidates(key)
    # 3 block_rows x 2 block_w x 3 warps x 2 evictions, plus stages 2 only for block_w 32
    assert len(candidates) == 3 * 3 * 2 * (1 + 2)
    assert all(c.num_stages == 1 for c in candidates if c.block_w == 64)
    assert any(c.num_stages == 2 for c in candidates if c.block_w == 32)
    assert not space.allows(LaunchConfig(4, 64, 4, num_stages=2), key)
    assert space.allows(LaunchConfig(4, 32, 4, num_stages=2), key)


def test_duplicate_values_are_collapsed(tmp_path):
    space = load_space(write(tmp_path, edit(GOOD_SPACE, "num_warps: [1, 2, 4]",
                                            "num_warps: [1, 2, 2, 4, 1]")))
    assert space.values("num_warps", TableKey(64, 128)) == [1, 2, 4]


# -- bad search spaces: SpaceError naming the file and the key ----------------------------------
BAD_SPACES = {
    "unknown top-level key": (GOOD_SPACE + "extra: 1\n", r"unknown keys \['extra'\]"),
    "unknown parameter": (edit(GOOD_SPACE, "  num_stages: [1, 2]\n",
                               "  num_stages: [1, 2]\n  num_ctas: [1]\n"),
                          r"parameters: unknown \['num_ctas'\]"),
    "missing parameter": (edit(GOOD_SPACE, "  num_stages: [1, 2]\n", ""),
                          r"parameters: .*missing \['num_stages'\]"),
    "empty list": (edit(GOOD_SPACE, "num_warps: [1, 2, 4]", "num_warps: []"),
                   r"parameters\.num_warps: must be a non-empty list"),
    "string in block_rows": (edit(GOOD_SPACE, "block_rows: [1, 2, 4]", "block_rows: [1, two, 4]"),
                             r"parameters\.block_rows: 'two' is not an int"),
    "bool in num_stages": (edit(GOOD_SPACE, "num_stages: [1, 2]", "num_stages: [true]"),
                           r"parameters\.num_stages: True is not an int"),
    "not a list": (edit(GOOD_SPACE, "num_warps: [1, 2, 4]", "num_warps: 4"),
                   r"parameters\.num_warps: must be a non-empty list"),
    "block_w not a power of two": (
        edit(GOOD_SPACE, "block_w: {relative_to_width: {min: 16, max: 65536, max_chunks: 2}}",
             "block_w: [32, 48]"),
        r"parameters\.block_w: values must be powers of two"),
    "block_rows zero": (edit(GOOD_SPACE, "block_rows: [1, 2, 4]", "block_rows: [0, 2]"),
                        r"parameters\.block_rows: values must be powers of two"),
    "bad num_warps": (edit(GOOD_SPACE, "num_warps: [1, 2, 4]", "num_warps: [3]"),
                      r"parameters\.num_warps: accepted values are"),
    "num_stages zero": (edit(GOOD_SPACE, "num_stages: [1, 2]", "num_stages: [0]"),
                        r"parameters\.num_stages: values must be >= 1"),
    "unknown eviction policy": (
        edit(GOOD_SPACE, 'eviction_policy: ["", evict_first]', "eviction_policy: [evict_never]"),
        r"parameters\.eviction_policy: \['evict_never'\] not accepted; accepted: "),
    "relative rule on another knob": (
        edit(GOOD_SPACE, "block_rows: [1, 2, 4]", "block_rows: {relative_to_width: {min: 1}}"),
        r"parameters\.block_rows: expected a list of values"),
    "unknown relative rule key": (
        edit(GOOD_SPACE, "max_chunks: 2", "chunks: 2"),
        r"parameters\.block_w\.relative_to_width: unknown keys \['chunks'\]"),
    "bad relative rule value": (
        edit(GOOD_SPACE, "min: 16", "min: 0"),
        r"parameters\.block_w\.relative_to_width\.min: must be a positive integer"),
    "relative min not a power of two": (
        edit(GOOD_SPACE, "min: 16", "min: 24"),
        r"parameters\.block_w\.relative_to_width\.min: must be a power of two, got 24"),
    "relative max not a power of two": (
        edit(GOOD_SPACE, "max: 65536", "max: 1000"),
        r"parameters\.block_w\.relative_to_width\.max: must be a power of two, got 1000"),
    "unknown restriction": (GOOD_SPACE + "  fastest_only: true\n",
                            r"restrictions\.fastest_only: unknown restriction; known: "),
    "restriction arg a string": (edit(GOOD_SPACE, "max_tile_elements: 16384",
                                      "max_tile_elements: lots"),
                                 r"restrictions\.max_tile_elements: expected int, got 'lots'"),
    "restriction arg a bool for int": (edit(GOOD_SPACE, "max_tile_elements: 16384",
                                            "max_tile_elements: true"),
                                       r"restrictions\.max_tile_elements: expected int, got True"),
    "restriction arg an int for bool": (edit(GOOD_SPACE, "stages_only_when_chunked: true",
                                             "stages_only_when_chunked: 1"),
                                        r"restrictions\.stages_only_when_chunked: expected bool"),
    "restrictions a list": (edit(GOOD_SPACE, "  max_tile_elements: 16384\n  stages_only_when_chunked: true\n",
                                 "  - max_tile_elements\n"),
                            r"restrictions: must be a mapping"),
    "no kernel": (edit(GOOD_SPACE, "kernel: add_layernorm\n", ""), r"kernel: must name the kernel"),
    "parameters not a mapping": ("kernel: add_layernorm\nparameters: [1, 2]\n",
                                 r"parameters: must be a mapping"),
    "top level a list": ("- 1\n- 2\n", r"expected a mapping with keys"),
    "empty file": ("", r"expected a mapping with keys"),
    "invalid YAML": (GOOD_SPACE + "  num_warps: [1, 2\n", r"not valid YAML"),
    "refine_last an unordered knob": (GOOD_SPACE + "refine_last: [eviction_policy]\n",
                                      r"refine_last: expected a list of knobs among "
                                      r"\['block_rows', 'block_w', 'num_warps', 'num_stages'\]"),
    "refine_last not a list": (GOOD_SPACE + "refine_last: num_stages\n",
                               r"refine_last: expected a list of knobs"),
}


@pytest.mark.parametrize("name", list(BAD_SPACES))
def test_bad_space_is_a_clear_error(tmp_path, name):
    text, match = BAD_SPACES[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=match) as raised:
        load_space(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert isinstance(raised.value, InputError)  # the CLI prints it without a traceback


def test_missing_space_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpaceError, match=r"nope\.yaml: cannot read search space: No such file"):
        load_space(path)


def test_restrictions_leaving_nothing_fail_at_candidates(tmp_path):
    path = write(tmp_path, edit(GOOD_SPACE, "max_tile_elements: 16384", "max_tile_elements: 1"))
    space = load_space(path)  # valid on its own: it depends on the problem
    with pytest.raises(SpaceError, match=rf"^{path}: restrictions \['max_tile_elements', "
                                         r"'stages_only_when_chunked'\] leave no valid config "
                                         r"for width 64, rows 128"):
        space.candidates(TableKey(width=64, rows=128))


def test_parse_space_names_memory_source():
    with pytest.raises(SpaceError, match=r"^<memory>: unknown keys"):
        parse_space({"kernel": "add_layernorm", "parameters": {}, "other": 1})


def test_shipped_space_chunks_wide_rows_in_large_steps_only():
    """Rows too wide for registers are walked in chunks of 4096 or more elements, down to a
    sixteenth of the row; narrower rows are never chunked into small steps."""
    from tuner import get_kernel

    spec = get_kernel("add_layernorm")
    space = load_space(spec.space_file)
    wide = {c.block_w for c in space.candidates(spec.table_key(spec.problem("64x45288", "float32")))}
    assert wide == {4096, 8192, 16384, 32768, 65536}
    mid = {c.block_w for c in space.candidates(spec.table_key(spec.problem("64x3077", "float32")))}
    assert mid == {4096}
    assert all(c.tile_elements >= 4 * 32 * c.num_warps or c.num_warps == 1 for c in
               space.candidates(spec.table_key(spec.problem("4096x423", "bfloat16"))))


def test_conv_space_drops_configs_over_sm89_shared_memory():
    """The whole-model kernel's dot operands must fit 99 KB a block (RTX 4090): with 64 input
    channels, 128 output channels over 64 positions need 128 KB and are dropped."""
    space = load_space(get_kernel("conv_transpose_tail").space_file)
    wide = TableKey(width=32, rows=16384, variant="ci64_co128_h32_none")
    narrow = TableKey(width=32, rows=16384, variant="ci32_co64_h32_none")
    big, small = LaunchConfig(128, 64, 8), LaunchConfig(64, 32, 2)
    assert not space.allows(big, wide) and space.allows(small, wide)
    assert space.allows(big, narrow)  # (2 * 64 + 3 * 128) * 32 * 4 = 64 KB
    assert all(space.allows(config, wide) for config in space.candidates(wide))
    with pytest.raises(SpaceError, match="conv_transpose_tail only"):
        space.allows(small, TableKey(width=16, rows=100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_shipped_space_holds_the_default(dtype):
    """The default is the first trial of a study (and what the tuner is compared with): it
    must be a config of the space, on every GPU model's properties."""
    from kernels.defaults import INTERPRETER_PROPERTIES, add_layernorm_default
    from tests.test_defaults import H100, RTX4090

    space = load_space(SPACE)
    for props in (RTX4090, H100, INTERPRETER_PROPERTIES):
        for width in (1, 22, 64, 100, 477, 768, 1289, 3275, 4096, 6226, 10532, 37586, 65536):
            for rows in (1, 45, 229, 5000, 4_000_000):
                if rows * width * dtype.itemsize > 4 << 30:
                    continue
                config = add_layernorm_default(rows, width, dtype.itemsize, props)
                assert space.allows(config, TableKey(width=width, rows=rows)), \
                    (props.name, rows, width, config)
