"""Proposing configs: the Tree-structured Parzen Estimator over a study's valid configs.

A search space's knobs form a product of which the restrictions keep a fraction, so a sampler
that proposes in the product (Optuna's TPE) spends most of its proposals, and most of the
driver's time (BENCHMARKS.md), on configs that are rejected or measured already. Here the same
estimator (Bergstra et al.; Optuna's defaults for the split and the prior) is built over the
valid configs themselves, so every proposal is a valid config not measured yet.

Each ordered knob enters as its rank among its values (a block of 4 rows is nearer 8 than 32),
the warps as the elements each thread handles (FEATURES), the eviction policy as a category.
The density around a measured config is a product kernel normalised over the valid configs,
so l(x) (the best measured) and g(x) (the rest, and the configs in flight, as Optuna's
constant liar counts them) are distributions over the configs that can be proposed.
"""

from __future__ import annotations

import math
import random
from typing import Collection, Mapping, Sequence

import numpy as np

from kernels import LaunchConfig

# The ordered features of a config, each in steps of one rank (a doubling for the sizes). The
# warps enter as the elements each thread handles (the tile over the threads): a kernel's time
# follows the work per thread more than the warp count, so configs that split a larger tile
# over more warps, or the same tile over its rows instead of its width, are near each other.
FEATURES = ("block_rows", "block_w", "elements_per_thread", "num_stages")
# Random configs proposed before the estimator takes over (Optuna's TPE: 10).
STARTUP_TRIALS = 8
# Candidates drawn from l(x) each proposal; the one with the largest l(x)/g(x) is proposed
# (Optuna's TPE: 24).
EI_CANDIDATES = 24
# Runner-ups kept from each proposal: the configs the next proposals most likely pick, which
# workers compile ahead.
RUNNER_UPS = 3
# Kernel width in ranks of an ordered knob, and the weight a category kernel leaves to the
# other categories.
BANDWIDTH_RANKS = 1.0
OTHER_CATEGORY_WEIGHT = 0.2


def good_count(measured: int) -> int:
    """How many of the best measured configs make up l(x) (Optuna's default gamma)."""
    return min(math.ceil(0.1 * measured), 25)


def features(config: LaunchConfig, choices: Mapping[str, Sequence]) -> list[float]:
    """``config``'s FEATURES: the ranks of its ordered knobs, log2 of its elements per thread."""
    elements_per_thread = config.tile_elements / (32 * config.num_warps)
    return [math.log2(elements_per_thread) if name == "elements_per_thread"
            else float(sorted(choices[name]).index(getattr(config, name))) for name in FEATURES]


def tiling(config: LaunchConfig) -> tuple[int, int, int]:
    """The tile and the warps that share it: what a config's time depends on most."""
    return config.block_rows, config.block_w, config.num_warps


class CandidateTPE:
    """Proposes the valid config that TPE expects to improve most, from a fixed candidate list.

    Proposals prefer, in turn, configs at the smallest value of each ``refine_last`` knob (a
    search space's setting: knobs that rarely change the time, such as the pipelining stages
    of a memory-bound row kernel, which change it by under 2% in nearly every recorded grid
    while making up two thirds of a chunked space) and configs whose :func:`tiling` is neither
    measured nor in flight in any policy: before the policy of a tiling is refined (by the
    estimator or the local search), the search covers more tilings, among which the
    landscape has isolated optima.

    After each proposal, :attr:`runner_ups` holds the candidates that came closest (the next
    proposals' likeliest picks; while proposals are random, the next random picks).
    """

    def __init__(self, candidates: Sequence[LaunchConfig], choices: Mapping[str, Sequence],
                 seed: int = 0, refine_last: Sequence[str] = ()) -> None:
        self.candidates = list(candidates)
        self.keys = [config.key() for config in self.candidates]  # built once: proposals are hot
        self.index = {key: position for position, key in enumerate(self.keys)}
        self.rng = random.Random(seed)
        # The order random proposals take candidates in: fixed, so the startup's picks are
        # known ahead (:meth:`startup_picks`) and compiled before they are proposed.
        self.startup_order = list(range(len(self.candidates)))
        self.rng.shuffle(self.startup_order)
        # Each candidate's knobs as the kernels see them: its ordered features, the policy.
        self.ranks = np.array([features(config, choices) for config in self.candidates])
        policies = list(choices["eviction_policy"])
        self.policies = np.array([policies.index(config.eviction_policy)
                                  for config in self.candidates])
        self.other_policy_weight = OTHER_CATEGORY_WEIGHT / max(1, len(policies) - 1)
        self.tilings = [tiling(config) for config in self.candidates]
        self.refinements = [any(getattr(config, knob) > min(choices[knob]) for knob in refine_last)
                            for config in self.candidates]
        self.runner_ups: list[LaunchConfig] = []

    def _components(self, centres: list[int]) -> np.ndarray:
        """``[x, j]``: the density at candidate x of the component centred on ``centres[j]``,
        normalised over the candidates."""
        distance = self.ranks[:, None, :] - self.ranks[None, centres, :]
        kernel = np.exp(-0.5 * (distance / BANDWIDTH_RANKS) ** 2).prod(axis=2)
        kernel *= np.where(self.policies[:, None] == self.policies[None, centres],
                           1.0 - OTHER_CATEGORY_WEIGHT, self.other_policy_weight)
        return kernel / kernel.sum(axis=0, keepdims=True)

    def propose(self, measured: Mapping[str, float | None], excluded: Collection[str]
                ) -> LaunchConfig | None:
        """A candidate not in ``measured`` (config key -> ms, None for a failure) nor in
        ``excluded`` (in flight here or elsewhere); None when none is left."""
        open_positions = [position for position, key in enumerate(self.keys)
                          if key not in measured and key not in excluded]
        self.runner_ups = []
        if not open_positions:
            return None
        known = [(value, self.index[key]) for key, value in measured.items() if key in self.index]
        if len(known) < STARTUP_TRIALS:
            picks = self.startup_picks([*measured, *excluded],
                                       min(1 + RUNNER_UPS, STARTUP_TRIALS - len(known)))
            self.runner_ups = picks[1:]
            return picks[0]
        open_positions = self._preferred(open_positions, [*measured, *excluded])
        ranked = sorted(known, key=lambda item: (item[0] is None, item[0] or 0.0))
        split = good_count(len(ranked))
        good = [position for _, position in ranked[:split]]
        bad = [position for _, position in ranked[split:]]
        bad += [self.index[key] for key in excluded if key in self.index]  # constant liar
        below = self._density(good)[open_positions]
        above = self._density(bad)[open_positions]
        drawn = self._draw(open_positions, below)
        ratios = {position: math.log(below[spot]) - math.log(above[spot])
                  for spot, position in drawn}
        ranked_positions = sorted(ratios, key=ratios.get, reverse=True)
        self.runner_ups = [self.candidates[position]
                           for position in ranked_positions[1:1 + RUNNER_UPS]]
        return self.candidates[ranked_positions[0]]

    def startup_picks(self, taken: Collection[str], count: int = STARTUP_TRIALS
                      ) -> list[LaunchConfig]:
        """The next ``count`` random proposals, in order, if nothing but ``taken`` (configs
        measured or in flight) and these picks is taken meanwhile: each the first open
        preferred candidate in :attr:`startup_order`."""
        taken = set(taken)
        picks: list[LaunchConfig] = []
        for _ in range(count):
            open_positions = [position for position, key in enumerate(self.keys)
                              if key not in taken]
            if not open_positions:
                break
            preferred = set(self._preferred(open_positions, list(taken)))
            position = next(position for position in self.startup_order if position in preferred)
            picks.append(self.candidates[position])
            taken.add(self.keys[position])
        return picks

    def _preferred(self, open_positions: list[int], taken: list[str]) -> list[int]:
        """The open positions proposals prefer (the class docstring says which), or all."""
        open_positions = [position for position in open_positions
                          if not self.refinements[position]] or open_positions
        taken_tilings = {self.tilings[self.index[key]] for key in taken if key in self.index}
        return [position for position in open_positions
                if self.tilings[position] not in taken_tilings] or open_positions

    def _density(self, centres: list[int]) -> np.ndarray:
        """The mixture of the components at ``centres`` and a uniform prior (weight of one)."""
        uniform = np.full(len(self.candidates), 1.0 / len(self.candidates))
        mixture = self._components(centres).sum(axis=1) if centres else 0.0
        return (mixture + uniform) / (len(centres) + 1)

    def _draw(self, positions: list[int], weights: np.ndarray) -> list[tuple[int, int]]:
        """Up to EI_CANDIDATES distinct (spot, position) pairs drawn with ``weights``."""
        spots = self.rng.choices(range(len(positions)), weights=weights.tolist(), k=EI_CANDIDATES)
        return [(spot, positions[spot]) for spot in dict.fromkeys(spots)]
