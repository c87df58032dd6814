"""The neighbourhood of a config in a study's space, where its local search looks."""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

from kernels import LaunchConfig

from .space import ORDERED_PARAMETERS


def neighbours(config: LaunchConfig, choices: Mapping[str, Sequence],
               valid: Mapping[str, LaunchConfig], last: Collection[str] = ()) -> list[LaunchConfig]:
    """The ``valid`` configs (by key) one step from ``config``: one numeric knob to the next of
    its ``choices`` up or down, the tile and the warps together (same work per thread), another
    policy, and last the steps of the knobs in ``last`` (a space's ``refine_last``)."""
    values = config.as_dict()

    def step(name: str, direction: int) -> Any:
        ordered = sorted(choices[name])
        index = ordered.index(values[name]) + direction
        return ordered[index] if 0 <= index < len(ordered) else None

    moves: list[dict[str, Any]] = []
    for direction in (-1, 1):
        for name in ORDERED_PARAMETERS:
            if name not in last:
                moves.append({name: step(name, direction)})
        for tile in ("block_rows", "block_w"):
            moves.append({tile: step(tile, direction), "num_warps": step("num_warps", direction)})
    moves += [{"eviction_policy": policy} for policy in choices["eviction_policy"]]
    moves += [{name: step(name, direction)} for name in ORDERED_PARAMETERS if name in last
              for direction in (-1, 1)]
    found = []
    for move in moves:
        if None in move.values():
            continue
        key = _key({**values, **move})
        if key in valid and key != config.key() and valid[key] not in found:
            found.append(valid[key])
    return found


def local_search(best: Sequence[LaunchConfig], choices: Mapping[str, Sequence],
                 valid: Mapping[str, LaunchConfig], taken: Collection[str],
                 last: Collection[str] = ()) -> list[LaunchConfig]:
    """The configs a local search around ``best`` (best first) tries, in order: their
    neighbours not ``taken`` (measured or in flight), those that only change knobs in ``last``
    after all the others."""
    found: dict[LaunchConfig, None] = {}
    for refining in (False, True):
        for config in best:
            for neighbour in neighbours(config, choices, valid, last):
                changed = {name for name in ORDERED_PARAMETERS
                           if getattr(neighbour, name) != getattr(config, name)}
                if (bool(changed) and changed <= set(last)) == refining \
                        and neighbour.key() not in taken:
                    found.setdefault(neighbour)
    return list(found)


def _key(params: dict[str, Any]) -> str:
    try:
        return LaunchConfig(**params).key()
    except ValueError:
        return ""
