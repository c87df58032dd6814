"""Proposing configs: the Tree-structured Parzen Estimator over a study's valid configs.

A search space's knobs form a product of which the restrictions keep a fraction, so a sampler
that proposes in the product (Optuna's TPE) spends most of its proposals, and most of the
driver's time (BENCHMARKS.md), on configs that are rejected or measured already. Here the same
estimator (Bergstra et al.; Optuna's defaults for the split and the prior) is built over the
valid configs themselves, so every proposal is a valid config not measured yet.

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


class CandidateTPE:
    """Proposes the valid config that TPE expects to improve most, from a fixed candidate list.

    After each proposal, :attr:`runner_ups` holds the candidates that came closest (the next
    proposals' likeliest picks; empty while proposals are random).
    """

    def __init__(self, candidates: Sequence[LaunchConfig], choices: Mapping[str, Sequence],
                 seed: int = 0) -> None:
        self.candidates = list(candidates)
        self.index = {config.key(): position for position, config in enumerate(self.candidates)}
        self.rng = random.Random(seed)
        # Each candidate's knobs as the kernels see them: ranks of the ordered ones, the policy.
        self.ranks = np.array([[sorted(choices[name]).index(getattr(config, name))
                                for name in ORDERED_KNOBS] for config in self.candidates], float)
        policies = list(choices["eviction_policy"])
        self.policies = np.array([policies.index(config.eviction_policy)
                                  for config in self.candidates])
        self.other_policy_weight = OTHER_CATEGORY_WEIGHT / max(1, len(policies) - 1)
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
        open_positions = [position for position, config in enumerate(self.candidates)
                          if config.key() not in measured and config.key() not in excluded]
        self.runner_ups = []
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
        ranked_positions = sorted(ratios, key=ratios.get, reverse=True)
        self.runner_ups = [self.candidates[position]
                           for position in ranked_positions[1:1 + RUNNER_UPS]]
        return self.candidates[ranked_positions[0]]

    def _density(self, centres: list[int]) -> np.ndarray:
        """The mixture of the components at ``centres`` and a uniform prior (weight of one)."""
        uniform = np.full(len(self.candidates), 1.0 / len(self.candidates))
        mixture = self._components(centres).sum(axis=1) if centres else 0.0
        return (mixture + uniform) / (len(centres) + 1)

    def _draw(self, positions: list[int], weights: np.ndarray) -> list[tuple[int, int]]:
        """Up to EI_CANDIDATES distinct (spot, position) pairs drawn with ``weights``."""
        spots = self.rng.choices(range(len(positions)), weights=weights.tolist(), k=EI_CANDIDATES)
        return [(spot, positions[spot]) for spot in dict.fromkeys(spots)]
