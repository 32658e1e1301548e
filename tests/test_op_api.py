"""The calling and result convention of every public op, checked mechanically.

- A result with more than one tensor is a NamedTuple; the primary result comes first and selections put
  values before indices, as ``torch.topk`` / ``torch.max`` do, then per-group extras.
- Ragged groups are always the keyword-only ``offsets=None``; the variant argument is always ``method``.
- The old spellings (``how=``, ``mode=``, ``step_offsets``, positional offsets) are plain TypeErrors.
- A 1-D input without offsets is one group, for the ops that gained the rule with this API.
"""

import inspect

import pytest
import torch
from helpers import ALL_BACKENDS

import fastsearch
from fastsearch import ops

OP_NAMES = sorted(name for name in ops.__all__ if inspect.isfunction(getattr(ops, name)))
RESULT_CLASSES = sorted(name for name in ops.__all__ if inspect.isclass(getattr(ops, name)))

# The documented result of every op: a NamedTuple class and its fields in order, or a single tensor.
RESULTS = {
    "segmented_topk": (ops.TopK, ("values", "indices")),
    "beam_prune": (ops.BeamSelection, ("values", "indices", "counts", "parents")),
    "ddim_step": (ops.DDIMStepOutput, ("prev_sample", "pred_original_sample")),
    "prm_scores": (ops.PRMScores, ("scores", "step_scores")),
}
# Ops over groups of candidates (they take ``offsets``) and ops with a variant (they take ``method``).
GROUPED_OPS = {"aggregate_steps", "beam_prune", "cosine_scores", "effective_sample_size", "ensemble_scores",
               "prm_scores", "resample", "segmented_topk", "sequence_keys", "vote"}
VARIANT_OPS = {"aggregate_steps", "ensemble_scores", "prm_scores", "resample", "vote"}
OLD_ARGUMENT_NAMES = {"how", "mode", "step_offsets"}


def _offsets(sizes, device):
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return torch.tensor(bounds, dtype=torch.int64, device=device)


def _calls(device):
    """One small, valid call of every public op: name -> (args, kwargs)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, generator=g).to(device)
    offsets = _offsets([3, 0, 4], device)
    sample = torch.randn(2, 5, generator=g).to(device)
    hidden = torch.randn(9, 6, generator=g).to(device)
    head = torch.randn(2, 6, generator=g).to(device)
    positions = torch.tensor([1, 4, 5, 8], device=device)
    return {
        "aggregate_steps": ((scores,), dict(offsets=offsets, method="min", empty=0.0)),
        "beam_prune": ((scores, 2), dict(offsets=offsets, refill_to=3)),
        "cosine_scores": ((hidden, head), dict(offsets=_offsets([4, 5], device))),
        "ddim_step": ((sample, sample, 0.5, 0.7), {}),
        "effective_sample_size": ((scores,), dict(offsets=offsets)),
        "ensemble_scores": ((torch.stack([scores, -scores]),), dict(offsets=offsets, method="zscore")),
        "flow_euler_step": ((sample, sample, 0.5, 0.3), {}),
        "flow_heun_step": ((sample, sample, sample, 0.5, 0.3), {}),
        "prm_scores": ((hidden, positions, head), dict(offsets=_offsets([1, 3], device), method="mean")),
        "prm_step_scores": ((hidden, positions, head), {}),
        "randn": (((2, 3),), dict(seed=1, device=device)),
        "renoise": ((sample, 0.7, 0.5), dict(seed=2)),
        "resample": ((scores, 4), dict(offsets=_offsets([3, 4], device), method="residual", seed=3)),
        "segmented_topk": ((scores, 2), dict(offsets=offsets)),
        "sequence_keys": ((torch.tensor([4, 5, 6, 4, 5, 6, 7], device=device),), dict(offsets=offsets)),
        "vote": ((torch.tensor([1, 2, 1, 3, 3, 2, 3], device=device), scores), dict(offsets=offsets,
                                                                                   method="weighted")),
        "zo_neighbors": ((sample, 3), dict(seed=4)),
    }


def test_every_op_is_covered():
    """A new public op must be added to the tables above (and so to this convention)."""
    assert set(_calls("cpu")) == set(OP_NAMES)
    assert {cls.__name__ for cls, _ in RESULTS.values()} == set(RESULT_CLASSES)


@pytest.mark.parametrize("name", RESULT_CLASSES)
def test_result_classes_are_exported(name):
    cls = getattr(ops, name)
    assert issubclass(cls, tuple) and hasattr(cls, "_fields"), f"{name} is not a NamedTuple"
    assert name in fastsearch.__all__ and getattr(fastsearch, name) is cls


def test_selections_order_fields_as_torch_topk():
    """values, then indices, as torch.topk and torch.max return them; then the per-group extras."""
    torch_order = torch.return_types.topk.__match_args__
    assert torch_order == torch.return_types.max.__match_args__ == ("values", "indices")
    for cls in (ops.TopK, ops.BeamSelection):
        assert cls._fields[:2] == torch_order


def test_ddim_step_output_has_diffusers_field_names():
    scheduling_ddim = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    assert ops.DDIMStepOutput._fields == tuple(scheduling_ddim.DDIMSchedulerOutput.__dataclass_fields__)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", OP_NAMES)
def test_result_type_and_field_order(device, backend, name):
    args, kwargs = _calls(device)[name]
    result = getattr(fastsearch, name)(*args, **kwargs, backend=backend)
    if name not in RESULTS:
        assert isinstance(result, torch.Tensor), f"{name} returns one tensor"
        return
    cls, fields = RESULTS[name]
    assert type(result) is cls and cls._fields == fields
    for index, field in enumerate(fields):  # positions and names agree
        assert result[index] is getattr(result, field)
    assert f":class:`{cls.__name__}`" in getattr(fastsearch, name).__doc__.split("Returns:")[1]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_fields_hold_what_they_name(device, backend):
    """The fields are not only ordered but filled right on every backend (the kernels' outputs are
    (indices, values, ...) for beam_prune: the wrapper reorders)."""
    calls = _calls(device)
    args, kwargs = calls["beam_prune"]
    scores, offsets = args[0], kwargs["offsets"]
    for selection in (fastsearch.segmented_topk(scores, 2, offsets=offsets, backend=backend),
                      fastsearch.beam_prune(*args, **kwargs, backend=backend),
                      fastsearch.segmented_topk(scores, 2, backend=backend),  # one group: 1-D results
                      fastsearch.beam_prune(scores, 2, refill_to=3, backend=backend)):
        assert selection.indices.dtype == torch.int64 and selection.values.is_floating_point()
        live = selection.indices >= 0
        torch.testing.assert_close(selection.values[live], scores[selection.indices[live]].float())
    beams = fastsearch.beam_prune(*args, **kwargs, backend=backend)
    assert beams.counts.tolist() == [2, 0, 2] and beams.parents.shape == (3, 3)

    sample, model_output, alpha, alpha_prev = calls["ddim_step"][0]
    step = fastsearch.ddim_step(sample, model_output, alpha, alpha_prev, backend=backend)
    x0 = (sample - (1 - alpha) ** 0.5 * model_output) / alpha**0.5
    torch.testing.assert_close(step.pred_original_sample, x0)
    torch.testing.assert_close(step.prev_sample, alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * model_output)

    args, kwargs = calls["prm_scores"]
    scored = fastsearch.prm_scores(*args, **kwargs, backend=backend)
    assert scored.scores.shape == (2,) and scored.step_scores.shape == (4,)
    torch.testing.assert_close(scored.step_scores, fastsearch.prm_step_scores(*args, backend=backend))


@pytest.mark.parametrize("name", OP_NAMES)
def test_offsets_is_keyword_only(name):
    parameters = inspect.signature(getattr(fastsearch, name)).parameters
    if name not in GROUPED_OPS:
        assert "offsets" not in parameters
        return
    offsets = parameters["offsets"]
    assert offsets.kind is inspect.Parameter.KEYWORD_ONLY and offsets.default is None
    assert not [p for p in parameters if p.endswith("_offsets")]


@pytest.mark.parametrize("name", OP_NAMES)
def test_variant_argument_is_method(name):
    parameters = inspect.signature(getattr(fastsearch, name)).parameters
    assert not OLD_ARGUMENT_NAMES & set(parameters)
    if name not in VARIANT_OPS:
        assert "method" not in parameters
        return
    method = parameters["method"]
    assert method.kind is inspect.Parameter.KEYWORD_ONLY and isinstance(method.default, str)


@pytest.mark.parametrize("name,old", [("aggregate_steps", "how"), ("prm_scores", "how"), ("ensemble_scores", "how"),
                                      ("vote", "mode"), ("aggregate_steps", "step_offsets"),
                                      ("prm_scores", "step_offsets")])
def test_old_keyword_is_a_type_error(name, old):
    args, kwargs = _calls("cpu")[name]
    kwargs = {key: value for key, value in kwargs.items() if key not in ("method", "offsets")}
    value = _offsets([7], "cpu") if old == "step_offsets" else "min"
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{old}'"):
        getattr(fastsearch, name)(*args, **kwargs, **{old: value})


def test_positional_offsets_are_a_type_error():
    calls = _calls("cpu")
    steps, offsets = calls["aggregate_steps"][0][0], calls["aggregate_steps"][1]["offsets"]
    with pytest.raises(TypeError, match="positional argument"):
        fastsearch.aggregate_steps(steps, offsets)
    (hidden, positions, head), kwargs = calls["prm_scores"]
    with pytest.raises(TypeError, match="positional argument"):
        fastsearch.prm_scores(hidden, positions, kwargs["offsets"], head)  # the old order
    with pytest.raises(TypeError, match="positional argument"):
        fastsearch.prm_scores(hidden, positions, head, kwargs["offsets"])
    (tokens,), kwargs = calls["sequence_keys"]
    with pytest.raises(TypeError, match="positional argument"):
        fastsearch.sequence_keys(tokens, kwargs["offsets"])
    with pytest.raises(TypeError, match="positional argument"):
        fastsearch.segmented_topk(steps, 2, offsets)


# -- one group without offsets, for the ops that follow the rule since this API ------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("method", ["last", "min", "prod", "mean", "max", "logit_sum"])
def test_aggregate_steps_one_candidate(device, backend, method):
    steps = torch.tensor([0.9, float("nan"), 0.4, 0.7], device=device)
    for scores in (steps, steps[1:], steps[2:], steps[::2]):
        out = fastsearch.aggregate_steps(scores, method=method, backend=backend)
        row = fastsearch.aggregate_steps(scores[None], method=method, backend=backend)
        assert out.shape == () and out.dtype == torch.float32
        torch.testing.assert_close(out, row[0], equal_nan=True, rtol=0, atol=0)
    empty = steps[:0]
    with pytest.raises(ValueError, match="candidate 0 has no steps"):
        fastsearch.aggregate_steps(empty, method=method, backend=backend)
    torch.testing.assert_close(fastsearch.aggregate_steps(empty, method=method, empty=-1.0, backend=backend),
                               torch.tensor(-1.0, device=device))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_prm_scores_one_candidate(device, backend):
    (hidden, positions, head), _ = _calls(device)["prm_scores"]
    out = fastsearch.prm_scores(hidden, positions, head, method="min", backend=backend)
    one = fastsearch.prm_scores(hidden, positions, head, offsets=_offsets([4], device), method="min", backend=backend)
    assert isinstance(out, ops.PRMScores) and out.scores.shape == () and out.step_scores.shape == (4,)
    torch.testing.assert_close(out.scores, one.scores[0], rtol=0, atol=0)
    torch.testing.assert_close(out.step_scores, one.step_scores, rtol=0, atol=0)
    with pytest.raises(ValueError, match="candidate 0 has no steps"):
        fastsearch.prm_scores(hidden, positions[:0], head, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_sequence_keys_one_sequence_and_dense(device, backend):
    tokens = torch.tensor([[4, 5, 6], [4, 5, 6], [6, 5, 4]], device=device)
    flat = fastsearch.sequence_keys(tokens.reshape(-1), offsets=_offsets([3, 3, 3], device), backend=backend)
    dense = fastsearch.sequence_keys(tokens, backend=backend)
    assert dense.shape == (3,) and torch.equal(dense, flat)
    assert torch.equal(fastsearch.sequence_keys(tokens.T.contiguous().T, backend=backend), flat)  # strided rows
    one = fastsearch.sequence_keys(tokens[2], backend=backend)
    assert one.shape == () and one.dtype == torch.int64 and torch.equal(one, flat[2])
    empty = fastsearch.sequence_keys(tokens[0, :0], backend=backend)
    assert torch.equal(empty, fastsearch.sequence_keys(tokens[0, :0], offsets=_offsets([0], device),
                                                       backend=backend)[0])
    assert fastsearch.sequence_keys(tokens[:, :0], backend=backend).shape == (3,)
    with pytest.raises(ValueError, match=r"token_ids must be \[N, L\]"):
        fastsearch.sequence_keys(tokens[None], backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_offsets_on_another_device_are_named(backend):
    """The error names `offsets` (the public word) and both devices; it once named an undefined variable."""
    steps = torch.tensor([0.9, 0.8, 0.3, 0.7])
    offsets = torch.tensor([0, 3, 4], device="meta")
    with pytest.raises((ValueError, RuntimeError), match="offsets"):
        fastsearch.aggregate_steps(steps, offsets=offsets, method="min", backend=backend)
    hidden, head = torch.randn(5, 4), torch.randn(2, 4)
    with pytest.raises((ValueError, RuntimeError), match="offsets"):
        fastsearch.prm_scores(hidden, torch.tensor([1, 3]), head, offsets=torch.tensor([0, 1, 2], device="meta"),
                              backend=backend)
