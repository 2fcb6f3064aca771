"""Built-in networks for config_train.json ("name": "MLP")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """A multilayer perceptron: Linear → activation (→ dropout) per hidden layer, then Linear.

    Args:
        in_features: Length of an input vector.
        num_classes: Number of outputs (class logits).
        hidden: Widths of the hidden layers; empty for a linear model.
        dropout: Dropout probability after each hidden activation.
        activation: One of ``relu``, ``gelu``, ``tanh``, ``silu``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        for arg, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        if isinstance(hidden, (str, bytes)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden
        ):
            raise ValueError(f"hidden must be a list of positive integers, got {hidden!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of shape ``(N, in_features)``."""
        return self.net(x.flatten(1))  # type: ignore[no-any-return]
