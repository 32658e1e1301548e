"""The LAION aesthetic predictor's head: a small MLP on L2-normalised CLIP ViT-L/14 image embeddings.

The published "improved aesthetic predictor" (``sac+logos+ava1-l14-linearMSE.pth``, trained on SAC, LAION-Logos
and AVA ratings with an MSE loss) is five linear layers with dropout between the first four and no activations,
768 -> 1024 -> 128 -> 64 -> 16 -> 1, saved as a state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}`` (the
dropouts are ``layers.1``, ``.3`` and ``.5``). Its scores are on the rating scale, about 1 to 10.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from fastsearch.checks import check_int

# (index in the Sequential, output width) of the linear layers; dropouts sit at 1, 3 and 5
_LINEAR_LAYERS = ((0, 1024), (2, 128), (4, 64), (6, 16), (7, 1))
_DROPOUTS = (0.2, 0.2, 0.1)


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor's MLP, with its published state-dict layout.

    Args:
        embed_dim: the CLIP image embedding width (768 for ViT-L/14).

    Shapes:
        forward: [B, embed_dim] L2-normalised image embeddings -> [B] scores.
    """

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = check_int("embed_dim", embed_dim)
        widths = [self.embed_dim] + [width for _, width in _LINEAR_LAYERS]
        modules = []
        for index in range(len(_LINEAR_LAYERS)):
            modules.append(nn.Linear(widths[index], widths[index + 1]))
            if index < len(_DROPOUTS):
                modules.append(nn.Dropout(_DROPOUTS[index]))
        self.layers = nn.Sequential(*modules)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_mlp(state_dict: Mapping[str, torch.Tensor] | str | os.PathLike) -> AestheticMLP:
    """An :class:`AestheticMLP` from the published state dict (or a path to the ``.pth`` file), in eval mode.

    The embedding width is read from ``layers.0.weight``; a checkpoint that nests the weights under
    ``"state_dict"`` (as Lightning saves them) is unwrapped. Missing, unexpected or misshapen keys are a
    ValueError listing them.
    """
    if isinstance(state_dict, str | os.PathLike):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors or a path, got {type(state_dict).__name__}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    first = state_dict.get("layers.0.weight")
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise ValueError("state_dict has no layers.0.weight matrix: not the LAION aesthetic predictor's layout "
                         f"(layers.{{0,2,4,6,7}}.{{weight,bias}}); its keys: {sorted(state_dict)[:12]}")
    mlp = AestheticMLP(first.shape[1])
    expected = mlp.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{name} {list(state_dict[name].shape)} (expected {list(value.shape)})"
             for name, value in expected.items() if name in state_dict and state_dict[name].shape != value.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"state_dict does not match the LAION aesthetic predictor's layout: missing {missing}, "
                         f"unexpected {unexpected}, misshapen {wrong}")
    mlp.load_state_dict({name: value.float() for name, value in state_dict.items()})
    return mlp.eval()
