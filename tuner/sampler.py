"""Proposing configs: the Tree-structured Parzen Estimator over a study's valid configs.

A search space's knobs form a product of which the restrictions keep a fraction, so a sampler
that proposes in the product (Optuna's TPE) spends most of its proposals on configs that are
rejected or measured already: a dozen proposals, and about 160 ms of the driver's time, per
measured trial on an H100 host. Here the same estimator (Bergstra et al.; Optuna's defaults for
the split and the prior) is built over the valid configs themselves, so every proposal is a
valid config not measured yet, at a cost of a few matrix columns.

Each knob enters as its rank among its values (4 warps is nearer 8 than 32); the eviction policy
as a category. The density around a measured config is a product kernel normalised over the
valid configs, so l(x) (the best measured) and g(x) (the rest, and the configs in flight, as
Optuna's constant liar counts them) are distributions over the configs that can be proposed.
"""

from __future__ import annotations

import math
import random
from typing import Collection, Mapping, Sequence

import numpy as np

from kernels import LaunchConfig

# Knobs whose values are ordered (sizes and counts), as opposed to the eviction policy.
ORDERED_KNOBS = ("block_rows", "block_w", "num_warps", "num_stages")
# Random configs proposed before the estimator takes over (Optuna's TPE: 10).
STARTUP_TRIALS = 8
# Candidates drawn from l(x) each proposal; the one with the largest l(x)/g(x) is proposed
# (Optuna's TPE: 24).
EI_CANDIDATES = 24
# Kernel width in ranks of an ordered knob, and the weight a category kernel leaves to the
# other categories.
BANDWIDTH_RANKS = 1.0
OTHER_CATEGORY_WEIGHT = 0.2


def good_count(measured: int) -> int:
    """How many of the best measured configs make up l(x) (Optuna's default gamma)."""
    return min(math.ceil(0.1 * measured), 25)


class CandidateTPE:
    """Proposes the valid config that TPE expects to improve most, from a fixed candidate list."""

    def __init__(self, candidates: Sequence[LaunchConfig], choices: Mapping[str, Sequence],
                 seed: int = 0) -> None:
        self.candidates = list(candidates)
        self.index = {config.key(): position for position, config in enumerate(self.candidates)}
        self.rng = random.Random(seed)
        self.kernel = self._kernel_matrix(choices)

    def _kernel_matrix(self, choices: Mapping[str, Sequence]) -> np.ndarray:
        """``kernel[x, c]``: the density at candidate x of the component centred on candidate c."""
        kernel = np.ones((len(self.candidates), len(self.candidates)))
        for name in ORDERED_KNOBS:
            ranks = {value: rank for rank, value in enumerate(sorted(choices[name]))}
            position = np.array([ranks[getattr(config, name)] for config in self.candidates], float)
            distance = position[:, None] - position[None, :]
            kernel *= np.exp(-0.5 * (distance / BANDWIDTH_RANKS) ** 2)
        policies = np.array([config.eviction_policy for config in self.candidates])
        others = max(1, len(choices["eviction_policy"]) - 1)
        kernel *= np.where(policies[:, None] == policies[None, :], 1.0 - OTHER_CATEGORY_WEIGHT,
                           OTHER_CATEGORY_WEIGHT / others)
        return kernel / kernel.sum(axis=0, keepdims=True)

    def propose(self, measured: Mapping[str, float | None], excluded: Collection[str]
                ) -> LaunchConfig | None:
        """A candidate not in ``measured`` (config key -> ms, None for a failure) nor in
        ``excluded`` (in flight here or elsewhere); None when none is left."""
        open_positions = [position for position, config in enumerate(self.candidates)
                          if config.key() not in measured and config.key() not in excluded]
        if not open_positions:
            return None
        known = [(value, self.index[key]) for key, value in measured.items() if key in self.index]
        if len(known) < STARTUP_TRIALS:
            return self.candidates[self.rng.choice(open_positions)]
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
        return self.candidates[max(ratios, key=ratios.get)]

    def _density(self, centres: list[int]) -> np.ndarray:
        """The mixture of the components at ``centres`` and a uniform prior (weight of one)."""
        uniform = np.full(len(self.candidates), 1.0 / len(self.candidates))
        return (self.kernel[:, centres].sum(axis=1) + uniform) / (len(centres) + 1)

    def _draw(self, positions: list[int], weights: np.ndarray) -> list[tuple[int, int]]:
        """Up to EI_CANDIDATES distinct (spot, position) pairs drawn with ``weights``."""
        spots = self.rng.choices(range(len(positions)), weights=weights.tolist(), k=EI_CANDIDATES)
        return [(spot, positions[spot]) for spot in dict.fromkeys(spots)]
