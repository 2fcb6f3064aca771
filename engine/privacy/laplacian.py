"""LaplacianProtocol: Clara 3.x's "laplacian" filter, rebuilt as SVT (its algorithm is inferred).

No source of Clara's ``LaplacianProtocol(fraction, epsilon, gamma, tau)`` is public, and it has no
NVFlare counterpart. What is known (clara-lineage.md §2.3): it takes SVT's parameters minus
``noise_var``; in Clara 2.x the name "laplacian" was mapped to ``SVTProtocol``; the Clara example
sets ``fraction: 50`` where SVT's examples say ``0.1``; and the notebook describes the mechanism
as SVT: threshold abs(x) + Lap(s), then share clip(x + Lap(s), γ).

Inferred, and chosen here:

- the algorithm is SVT's (``SVTProtocol``: same threshold, query budget ε2 = ε1·(2n)^(2/3),
  selection loop, draws with replacement, release; non-released values are zeroed);
- ``fraction`` is a percentage when it is above 1 (``50`` means q = 0.5) and a fraction
  otherwise (``0.1`` means q = 0.1; ``1`` means all of them); allowed range (0, 100];
- the release noise is Lap(2γ/ε3) with ε3 = ``noise_var``, which defaults to ``epsilon`` (ε3
  cannot be derived from public sources; it is configurable for that reason).
"""

from __future__ import annotations

from engine.privacy._checks import check_number
from engine.privacy.svt import SVTProtocol

__all__ = ["LaplacianProtocol"]


class LaplacianProtocol(SVTProtocol):
    """Clara's "laplacian" differential privacy: SVT with a percentage ``fraction`` (inferred).

    See this module's docstring for what is inferred and ``SVTProtocol`` for the algorithm.

    Args:
        fraction: the share of values to upload: a percentage when > 1, else a fraction; in
            (0, 100].
        epsilon: ε1, the threshold's privacy budget, > 0.
        gamma: γ, the clipping bound, > 0.
        tau: τ, the threshold, a finite number.
        noise_var: ε3, the release noise budget, > 0; None (the default) uses ``epsilon``.
        seed: seed of the generators; None for fresh entropy.
        max_passes: the most selection passes per round, >= 1.

    Raises:
        PrivacyArgumentError: an argument outside its range.
    """

    def __init__(
        self,
        fraction: float = 0.1,
        epsilon: float = 1000,
        gamma: float = 0.001,
        tau: float = 0.0001,
        noise_var: float | None = None,
        seed: int | None = None,
        max_passes: int = 100,
    ) -> None:
        given = check_number("fraction", fraction, low=0, high=100, low_open=True)
        q = given / 100.0 if given > 1 else given
        super().__init__(
            fraction=q,
            epsilon=epsilon,
            noise_var=epsilon if noise_var is None else noise_var,
            gamma=gamma,
            tau=tau,
            seed=seed,
            max_passes=max_passes,
        )
        self.fraction = given  # as configured; the share used is ``self._q``
