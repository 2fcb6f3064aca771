"""SVTProtocol: differentially private selection and release by the Sparse Vector Technique."""

from __future__ import annotations

import secrets
from typing import Any

from engine.privacy._checks import check_int, check_number, check_seed, total_steps
from engine.privacy.base import PrivacyProtocol

__all__ = ["SVTProtocol"]


class SVTProtocol(PrivacyProtocol):
    """Shares a noisy, clipped ``fraction`` of the update chosen by the Sparse Vector Technique.

    Clara 3.1 ``SVTProtocol`` / NVFlare ``SVTPrivacy``, after Li et al. 2019 (arXiv:1910.00962).
    With T = ``train_ctx["total_steps"]`` (1 when absent), ε1 = ``epsilon``, ε3 = ``noise_var``,
    γ = ``gamma``, τ = ``tau``:

    1. x = the concatenation of Δ[name] / T over the sorted names; N = len(x) (a 0-d variable
       holds one slot); n = min(ceil(N · fraction), N);
    2. noisy threshold τ̂ = τ + Lap(2γ/ε1); query budget ε2 = ε1 · (2n)^(2/3), query noise scale
       λν = 4γn/ε2;
    3. a = |clip(x, -γ, γ)|; while fewer than n are accepted, every remaining candidate draws a
       fresh ν ~ Lap(λν) and is accepted when a + ν >= τ̂;
    4. n draws with replacement among the accepted (the reference's ``np.random.choice``);
    5. each drawn entry is released as clip(x + Lap(2γ/ε3), -γ, γ) · T; a 0-d variable passes
       through unchanged.

    **Everything not released is zero.** The reference leaves the entries that passed the
    threshold but were not drawn in step 4 at their raw, unclipped, noise-free value; here they
    are zeroed, like the candidates never accepted, so no raw value leaks. At most n entries are
    non-zero, each within ±γ·T.

    The selection loop of the reference can spin for a long time when τ̂ is large against λν;
    here it stops after ``max_passes`` passes, or sooner when the passes left are not expected
    to accept even one more candidate (a warning is logged), and the n draws of step 4 are then
    made among the fewer candidates accepted so far: fewer values are shared, never more, and
    if none was accepted nothing is shared. When no candidate can pass at all (the acceptance
    probability underflows) no pass is run.

    Randomness comes from a ``torch.Generator`` per device, seeded from ``seed`` (a fixed seed
    reproduces every round exactly, on one device) or from the OS's entropy when it is None.
    Step 3 draws one random byte per candidate and pass, which settles all but ~1/128 of them
    (those draw the rest of their uniform and test exactly): the same distribution as drawing
    each ν, at a fraction of the cost. numpy arrays give numpy arrays, torch tensors give torch
    tensors on the same device and dtype; integer variables pass through as copies; the caller's
    arrays are not modified, unless ``apply(..., in_place=True)`` asks for the result in them
    (the same values and draws, no model-sized allocation). Work buffers are kept on the
    instance across rounds, so an instance is not for concurrent use.

    Args:
        fraction: the fraction q of the values to share, in (0, 1].
        epsilon: ε1, the threshold's privacy budget, > 0.
        noise_var: ε3, the budget of the release noise, > 0.
        gamma: γ, the clipping bound, > 0.
        tau: τ, the threshold, a finite number.
        seed: seed of the generators; None for fresh entropy.
        max_passes: the most selection passes per round, >= 1.

    Raises:
        PrivacyArgumentError: an argument outside its range (a ``ValueError`` whose ``arg``
            names it, so the config error names ``client.privacy.args.<arg>``).
    """

    def __init__(
        self,
        fraction: float = 0.1,
        epsilon: float = 0.1,
        noise_var: float = 0.1,
        gamma: float = 1e-05,
        tau: float = 1e-06,
        seed: int | None = None,
        max_passes: int = 100,
    ) -> None:
        self.fraction = check_number("fraction", fraction, low=0, high=1, low_open=True)
        self._q = self.fraction
        self.epsilon = check_number("epsilon", epsilon, low=0, low_open=True)
        self.noise_var = check_number("noise_var", noise_var, low=0, low_open=True)
        self.gamma = check_number("gamma", gamma, low=0, low_open=True)
        self.tau = check_number("tau", tau)
        self.seed = check_seed(seed)
        self.max_passes = check_int("max_passes", max_passes, low=1)
        self.last_stats: Any = None  # engine.privacy._ops.SvtStats of the last apply
        self._generators: dict[str, Any] = {}
        self._workspace: Any = None

    def _generator(self, device: Any) -> Any:
        import torch  # deferred: torch loads on first use, not with the config

        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
            self._generators[key] = g
        return g

    def apply(
        self, model_diff: dict[str, Any], train_ctx: Any = None, *, in_place: bool = False
    ) -> dict[str, Any]:
        """The privatized update.

        Args:
            model_diff: Δ = local − global, variable name to numpy array or torch tensor.
            train_ctx: a mapping (or object) with ``total_steps``, the local steps T; None
                (the default, as in the lineage) for T = 1.
            in_place: write the result into ``model_diff``'s own arrays (the caller gives
                their memory up: no model-sized result is allocated) and return them; integer
                and bool variables pass through as they are. The result is bit for bit the
                one a new Δ gets (False, the default: the input is left as it is). An array
                that cannot be written (read-only, non-contiguous, byte-swapped) or that
                shares memory with another variable gets a new result instead.

        Returns:
            variable name to array, the same names, types, shapes, dtypes and devices.

        Raises:
            NonFiniteDiffError: a variable holds NaN or Inf (named in the error).
        """
        from engine.privacy import _ops  # deferred: torch loads on first use, not with the config

        if self._workspace is None:
            self._workspace = _ops.Workspace()
        out, self.last_stats = _ops.svt(
            model_diff,
            fraction=self._q,
            epsilon=self.epsilon,
            noise_var=self.noise_var,
            gamma=self.gamma,
            tau=self.tau,
            steps=total_steps(train_ctx),
            max_passes=self.max_passes,
            generator=self._generator,
            workspace=self._workspace,
            in_place=in_place,
        )
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(fraction={self.fraction:g}, epsilon={self.epsilon:g}, "
            f"noise_var={self.noise_var:g}, gamma={self.gamma:g}, tau={self.tau:g})"
        )
