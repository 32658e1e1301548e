"""Inputs `make fuzz` (tests/fuzz_outcomes.py) found handled badly, each on every backend that runs here."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_BACKENDS

import fastsearch


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_positive_index_past_int64_is_named(device, backend):
    hidden, head = torch.randn(4, 8, device=device), torch.randn(2, 8, device=device)
    positions = torch.tensor([1, 3], device=device)
    for bad in (2**70, -1, 2):
        with pytest.raises(ValueError, match=r"positive_index must be in \[0, C=2\)"):
            fastsearch.prm_step_scores(hidden, positions, head, positive_index=bad, backend=backend)
        with pytest.raises(ValueError, match=r"positive_index must be in \[0, C=2\)"):
            fastsearch.prm_scores(hidden, positions, head, offsets=torch.tensor([0, 2], device=device),
                                  positive_index=bad, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_randn_shape_as_a_0d_tensor(device, backend):
    torch.testing.assert_close(fastsearch.randn(torch.tensor(5), seed=3, device=device, backend=backend),
                               fastsearch.randn((5,), seed=3, device=device, backend=backend))
    for bad in (torch.tensor(2.0), torch.tensor(True), torch.tensor([2.0, 3.0])):
        with pytest.raises(TypeError, match="^shape must be"):
            fastsearch.randn(bad, seed=3, device=device, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_cosine_of_huge_components_agrees_with_the_contract(device, backend):
    """fp32 sums of squares on every backend, the reference included: past ~1.8e19 a norm overflows alike."""
    embeddings = torch.full((3, 2), 1e30, device=device)
    references = torch.tensor([-1.5, 0.5], device=device)
    got = fastsearch.cosine_scores(embeddings, references, backend=backend)
    assert torch.equal(got, torch.zeros(3, device=device))  # -0.0 == 0.0: dot / inf
    moderate = fastsearch.cosine_scores(torch.full((1, 2), 1e18, device=device), references, backend=backend)
    expected = torch.nn.functional.cosine_similarity(torch.ones(1, 2, dtype=torch.float64),
                                                     references.double().cpu()[None], dim=-1)  # -1 / sqrt(5)
    torch.testing.assert_close(moderate.cpu().double(), expected)
