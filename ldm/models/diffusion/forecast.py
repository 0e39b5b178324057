"""Forecasting cached features between refreshes, as TaylorSeer does (Liu et al., ICCV 2025), with loop indices as
the time axis; the `forecast` option of the caches that reuse features (FasterDiffusion, DeepCache).

At a refresh at loop index a, after the previous one at a', the stored factors become

    D_0(a) = F(a),   D_(k+1)(a) = (D_k(a) - D_k(a')) / (a - a')   for k < m,

each once the refreshes seen so far define it (the first refresh gives D_0 alone, the second D_0 and D_1, ...),
and a step i after the refresh at a uses

    F^(i) = sum over the defined k of D_k(a) (i - a)^k / k!.

m = 0 reuses F(a) unchanged. A feature that is linear in the loop index is forecast exactly at m >= 1. Each D_k is
a backward difference, the slope at the middle of the last interval, so a quadratic is not exact: with refreshes
every h steps, F(i) = c i^2 is forecast s steps after a refresh with the error -c h s.
"""
import argparse
import math

import torch

from ldm.models.diffusion.options import Option

ORDERS = (0, 1, 2)


def forecast_order(value):
    """The order m of the expansion: 0, 1 or 2."""
    if value.strip() not in tuple(map(str, ORDERS)):
        raise argparse.ArgumentTypeError(f"expected an order of 0, 1 or 2, not {value!r}")
    return int(value)


FORECAST = Option("forecast", forecast_order,
                  help="forecast the cached features between refreshes with a Taylor expansion of this order "
                       "(TaylorSeer): 0 reuses them as they are (default), 1 or 2")


def check_order(order, cache):
    """order (an int in 0..2) or a one-line ValueError naming the cache."""
    if isinstance(order, bool) or not isinstance(order, int) or order not in ORDERS:
        raise ValueError(f"{cache} forecast must be an order of 0, 1 or 2, not {order!r}")
    return order


class TaylorFeatures:
    """The factors D_0..D_m of one cached feature (a tensor, or a list of tensors expanded together), updated at
    each refresh and evaluated at later loop indices."""

    def __init__(self, order):
        self.order = order
        self.at = None  # the loop index of the last refresh
        self.factors = []  # D_0, D_1, ...: each a list of tensors

    def refresh(self, index, feature):
        """Store the feature computed at loop index `index` and update the differences."""
        new = [_as_list(feature)]
        if self.at is not None:
            gap = index - self.at
            for k in range(min(self.order, len(self.factors))):
                new.append([(d - old) / gap for d, old in zip(new[k], self.factors[k])])
        self.at, self.factors = index, new

    def at_step(self, index):
        """F^(index) as a list of tensors; at order 0 (or right after the first refresh) the stored tensors."""
        if len(self.factors) == 1:
            return self.factors[0]
        steps = index - self.at
        weights = [steps ** k / math.factorial(k) for k in range(len(self.factors))]
        return [sum(w * d[j] for w, d in zip(weights, self.factors)) for j in range(len(self.factors[0]))]

    def at_steps(self, indices):
        """F^ at several loop indices, each tensor stacked step-major (rows of index j at j*M..(j+1)*M-1), as one
        decoder call takes them."""
        per_step = [self.at_step(i) for i in indices]
        return [torch.cat(parts) for parts in zip(*per_step)]


def _as_list(feature):
    return list(feature) if isinstance(feature, (list, tuple)) else [feature]
