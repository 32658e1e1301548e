"""Regression tests of issue 18 for the step and noise ops: what a hostile caller found, on every backend here.

Strided inputs, tensors a backend cannot read (meta), NaN and inf (the contract of csrc/README.md), the
stream's seed and offset ranges, renoise's variance difference, and clear errors for bad arguments.
"""

import math

import pytest
import torch
from helpers import ALL_BACKENDS

import fastsearch
from fastsearch.seeding import MAX_SEED, STREAM_LENGTH

NAN, INF = float("nan"), float("inf")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_same(out, ref, dtype=torch.float32):
    """Same NaN places, same infinities, finite values to rounding (every backend evaluates one expression)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol, equal_nan=True)


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


# -- 1. any layout: strided, expanded, transposed inputs -------------------------------------------------


def _layouts(batch, device):
    """(name, schedule tensor of one layout): a strided [B] view, an expanded scalar, a column of a matrix."""
    values = torch.rand(2 * batch, generator=_gen(1)) * 0.5 + 0.25
    return [("strided", values.to(device)[::2]),
            ("expanded", torch.tensor(0.4, device=device).expand(batch)),
            ("column", values.reshape(batch, 2).to(device)[:, 1])]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs_read_like_contiguous(device, backend, dtype):
    batch, g = 3, _gen(0)
    # transposed sample and model outputs, strided noise
    x = torch.randn(batch, 7, 5, generator=g).to(dtype).to(device).transpose(1, 2)
    m = torch.randn(batch, 7, 5, generator=g).to(dtype).to(device).transpose(1, 2)
    m2 = torch.randn(batch, 5, 14, generator=g).to(dtype).to(device)[..., ::2]
    noise = torch.randn(batch, 5, 14, generator=g).to(dtype).to(device)[..., 1::2]
    assert not (x.is_contiguous() or noise.is_contiguous() or m2.is_contiguous())
    for name, level in _layouts(batch, device):
        assert not level.is_contiguous(), name
        plain = level.contiguous()
        calls = [
            lambda s, xs, ms, n, ns, b: fastsearch.ddim_step(xs, ms, s * 0.5, s, eta=0.7, noise=n, backend=b),
            lambda s, xs, ms, n, ns, b: fastsearch.ddim_step(xs, ms, s * 0.5, s, eta=1.0, seed=3,
                                                             prediction_type="v_prediction", backend=b),
            lambda s, xs, ms, n, ns, b: fastsearch.flow_euler_step(xs, ms, s, s * 0.5, backend=b),
            lambda s, xs, ms, n, ns, b: fastsearch.flow_euler_step(xs, ms, s, s * 0.5, noise=n, stochastic=True,
                                                                   backend=b),
            lambda s, xs, ms, n, ns, b: fastsearch.flow_heun_step(xs, ms, ns, s, s * 0.5, backend=b),
            lambda s, xs, ms, n, ns, b: fastsearch.renoise(xs, s * 0.5, s, schedule="flow", noise=n, backend=b),
            lambda s, xs, ms, n, ns, b: fastsearch.renoise(xs, s, s * 0.5, schedule="vp", seed=5, backend=b),
        ]
        for call in calls:
            out = call(level, x, m, noise, m2, backend)
            ref = call(plain, x.contiguous(), m.contiguous(), noise.contiguous(), m2.contiguous(), "torch")
            for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,),
                            strict=True):
                _assert_same(o, r, dtype)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_the_issues_strided_sigma(device, backend):
    s = torch.tensor([.7171, 0, .8694, 0, .9347, 0], device=device)[::2]
    x, v = torch.randn(3, 1, generator=_gen(2)).to(device), torch.randn(3, 1, generator=_gen(3)).to(device)
    out = fastsearch.flow_euler_step(x, v, s, s * 0.25, backend=backend)
    expected = x + (s * 0.25 - s)[:, None] * v
    torch.testing.assert_close(out, expected)


# -- 2. tensors a backend cannot read ----------------------------------------------------------------------


def _step_calls(device):
    """(argument name, call taking that argument swapped for ``t``) for every tensor argument of every step."""
    x = torch.randn(3, 4, device=device)
    s = torch.full((3,), 0.5, device=device)
    return [
        ("sample", lambda t, b: fastsearch.flow_euler_step(t, x, 0.5, 0.3, backend=b)),
        ("velocity", lambda t, b: fastsearch.flow_euler_step(x, t, 0.5, 0.3, backend=b)),
        ("noise", lambda t, b: fastsearch.flow_euler_step(x, x, 0.5, 0.3, noise=t, stochastic=True, backend=b)),
        ("velocity_next", lambda t, b: fastsearch.flow_heun_step(x, x, t, 0.5, 0.3, backend=b)),
        ("model_output", lambda t, b: fastsearch.ddim_step(x, t, 0.5, 0.6, backend=b)),
        ("noise", lambda t, b: fastsearch.ddim_step(x, x, 0.5, 0.6, eta=1.0, noise=t, backend=b)),
        ("noise", lambda t, b: fastsearch.renoise(x, 0.3, 0.5, schedule="flow", noise=t, backend=b)),
        ("out", lambda t, b: fastsearch.renoise(x, 0.3, 0.5, schedule="flow", seed=1, out=t, backend=b)),
        ("sigma", lambda t, b: fastsearch.flow_heun_step(x, x, x, t[:3, 0], s, backend=b)),
        ("level_to", lambda t, b: fastsearch.renoise(x, s, t[:3, 0], schedule="vp", seed=1, backend=b)),
    ]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_meta_tensors_are_refused_with_their_name(device, backend):
    for name, call in _step_calls(device):
        with pytest.raises(ValueError, match=rf"^{name}\b.* meta"):
            call(torch.full((3, 4), 0.5, device="meta"), backend)
    with pytest.raises(ValueError, match="sigma is on meta"):
        fastsearch.flow_euler_step(torch.randn(3, 4, device=device), torch.randn(3, 4, device=device),
                                   torch.tensor(0.5, device="meta"), 0.3, backend=backend)
    with pytest.raises(ValueError, match="pivot is on meta"):
        fastsearch.zo_neighbors(torch.randn(3, 4, device="meta"), 2, seed=0, backend=backend)
    with pytest.raises(ValueError, match="device is meta"):
        fastsearch.randn((3,), seed=0, device="meta", backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_required_tensor_passed_as_none_is_named(device, backend):
    for name, call in _step_calls(device)[:5]:
        if name == "noise":
            continue
        with pytest.raises(TypeError, match=rf"^{name} must be a tensor"):
            call(None, backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_fake_tensors_still_trace(device, backend):
    """The fakes stay: under FakeTensorMode (what torch.compile traces with) the ops give shapes, no error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 4, 5, device=device)
        prev, x0 = fastsearch.ddim_step(x, x, torch.full((3,), 0.5, device=device), 0.6, backend=backend)
        euler = fastsearch.flow_euler_step(x, x, 0.5, 0.3, backend=backend)
    assert prev.shape == x0.shape == euler.shape == (3, 4, 5)


# -- 3. NaN is never dropped; NaN arguments are refused ---------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_ddim_eta_zero_going_backwards_is_nan(device, backend):
    x, m = torch.randn(2, 6, device=device), torch.randn(2, 6, device=device)
    prev, x0 = fastsearch.ddim_step(x, m, 0.5, 0.4, eta=0.0, backend=backend)
    assert bool(prev.isnan().all()), prev
    assert bool(x0.isfinite().all())


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_bad_eta_is_refused(device, backend):
    x = torch.randn(2, 6, device=device)
    for eta in (NAN, INF, -0.5):
        with pytest.raises(ValueError, match="eta must be"):
            fastsearch.ddim_step(x, x, 0.5, 0.6, eta=eta, seed=0, backend=backend)
    for eta in ("0.5", None, [0.5]):
        with pytest.raises(TypeError, match="eta must be a float"):
            fastsearch.ddim_step(x, x, 0.5, 0.6, eta=eta, seed=0, backend=backend)
    with pytest.raises(TypeError, match="clip_sample_range must be a float"):
        fastsearch.ddim_step(x, x, 0.5, 0.6, clip_sample_range="1", backend=backend)
    with pytest.raises(ValueError, match="clip_sample_range must be"):
        fastsearch.ddim_step(x, x, 0.5, 0.6, clip_sample_range=NAN, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_renoise_levels_must_be_finite_and_in_range(device, backend, schedule):
    x = torch.randn(2, 6, device=device)
    good_from, good_to = (0.8, 0.5) if schedule == "vp" else (0.3, 0.6)
    bad = [(NAN, good_to, "level_from"), (-INF, good_to, "level_from"), (INF, good_to, "level_from"),
           (good_from, NAN, "level_to"), (good_from, -INF, "level_to"), (good_from, INF, "level_to"),
           (good_from, -0.1 if schedule == "vp" else 1.1, "level_to"),
           (good_from, torch.tensor([good_to, NAN], device=device), "level_to"),
           (torch.tensor([NAN, good_from], device=device), good_to, "level_from")]
    for start, end, name in bad:
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            fastsearch.renoise(x, start, end, schedule=schedule, seed=0, backend=backend)


# -- 4. the stream's ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_offsets_past_the_stream_are_refused(device, backend):
    for offset, numel in ((STREAM_LENGTH, 4), (STREAM_LENGTH - 2, 4), (STREAM_LENGTH, 0), (2**64, 1)):
        with pytest.raises(ValueError, match="offset"):
            fastsearch.randn((numel,), seed=0, offset=offset, device=device, backend=backend)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*63\)"):
        fastsearch.randn((4,), seed=0, offset=-1, device=device, backend=backend)
    with pytest.raises(TypeError, match="offset must be an int"):
        fastsearch.randn((4,), seed=0, offset="3", device=device, backend=backend)
    for seed in (MAX_SEED, -1):
        with pytest.raises(ValueError, match="seed must be in"):
            fastsearch.randn((4,), seed=seed, device=device, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("numel", [1, 3, 4, 9])
def test_the_end_of_the_stream_is_written_whole(device, backend, numel):
    offset = STREAM_LENGTH - numel
    out = torch.full((numel,), NAN, device=device)
    fastsearch.randn((numel,), seed=MAX_SEED - 1, offset=offset, out=out, backend=backend)
    ref = fastsearch.randn((numel,), seed=MAX_SEED - 1, offset=offset, device=device, backend="torch")
    assert bool(out.isfinite().all()), out
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    again = fastsearch.randn((numel,), seed=MAX_SEED - 1, offset=offset, device=device, backend=backend)
    assert torch.equal(again, out)


# -- 5. NaN and inf: every backend follows the reference's expression ------------------------------------


def _sprinkle(t, g, share=0.15):
    """``t`` with NaN, +inf and -inf at random places (and a few zeros)."""
    pick = torch.rand(t.shape, generator=g)
    t = t.clone()
    t[pick < share] = NAN
    t[(pick >= share) & (pick < 2 * share)] = INF
    t[(pick >= 2 * share) & (pick < 3 * share)] = -INF
    t[(pick >= 3 * share) & (pick < 3.3 * share)] = 0.0
    return t


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nan_and_inf_follow_the_reference(device, backend, dtype):
    g = _gen(7)
    batch = 12
    x = _sprinkle(torch.randn(batch, 3, 5, generator=g) * 4, g).to(dtype).to(device)
    m = _sprinkle(torch.randn(batch, 3, 5, generator=g) * 4, g).to(dtype).to(device)
    m2 = _sprinkle(torch.randn(batch, 3, 5, generator=g), g).to(dtype).to(device)
    noise = _sprinkle(torch.randn(batch, 3, 5, generator=g), g).to(dtype).to(device)
    # schedule values with the edges: 0, 1, NaN, +-inf, > 1, < 0
    specials = torch.tensor([0.0, 1.0, NAN, INF, -INF, 1.5, -0.5, 0.3, 0.7, 0.5, 0.5, 0.9])
    alpha = specials.to(device)
    alpha_prev = specials[torch.randperm(batch, generator=g)].to(device)
    plain_prev = torch.rand(batch, generator=g).to(device)
    levels_low = torch.rand(batch, generator=g).to(device) * 0.5
    levels_high = levels_low + torch.rand(batch, generator=g).to(device) * 0.4
    levels_high[::3] = levels_low[::3]  # equal levels for every third sample
    calls = []
    etas = ((0.0, {}), (0.8, {"noise": noise}), (1.0, {"seed": 3}))
    schedules = ((alpha, alpha_prev), (plain_prev * 0.5, plain_prev), (0.3, 0.6), (NAN, 0.5))
    combos = [(p, c, u) for p in ("epsilon", "sample", "v_prediction")
              for c, u in ((None, False), (1.5, False), (1.5, True), (INF, True))]
    # every prediction type and clip with each eta in turn, the edge schedules with every eta and prediction type
    picks = [(p, c, u, etas[i % 3], schedules[i % 4]) for i, (p, c, u) in enumerate(combos)]
    picks += [(p, None, False, e, schedules[0]) for p in ("epsilon", "sample", "v_prediction") for e in etas]
    for prediction_type, clip, use_clipped, (eta, extra), (a, a_prev) in picks:
        calls.append(lambda b, p=prediction_type, c=clip, u=use_clipped, e=eta, k=extra, a=a, ap=a_prev:
                     fastsearch.ddim_step(x, m, a, ap, eta=e, prediction_type=p, clip_sample_range=c,
                                          use_clipped_model_output=u, backend=b, **k))
    for s, s_next in ((alpha, alpha_prev), (0.5, INF), (NAN, 0.2), (levels_high, levels_low)):
        calls.append(lambda b, s=s, sn=s_next: fastsearch.flow_euler_step(x, m, s, sn, backend=b))
        calls.append(lambda b, s=s, sn=s_next: fastsearch.flow_euler_step(x, m, s, sn, noise=noise, stochastic=True,
                                                                          backend=b))
        calls.append(lambda b, s=s, sn=s_next: fastsearch.flow_heun_step(x, m, m2, s, sn, backend=b))
    for extra in ({"noise": noise}, {"seed": 9}):
        calls.append(lambda b, k=extra: fastsearch.renoise(x, levels_low, levels_high, schedule="flow", backend=b, **k))
        calls.append(lambda b, k=extra: fastsearch.renoise(x, 1.0 - levels_low, 1.0 - levels_high, schedule="vp",
                                                           backend=b, **k))
        calls.append(lambda b, k=extra: fastsearch.renoise(x, 0.0, 1.0, schedule="flow", backend=b, **k))
    for index, call in enumerate(calls):
        out, ref = call(backend), call("torch")
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,),
                        strict=True):
            assert o.dtype == dtype
            try:
                _assert_same(o, r, dtype)
            except AssertionError as exc:
                raise AssertionError(f"call {index}: {exc}") from None


# -- 6. renoise: equal levels are the identity, nearby levels are accurate --------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_renoise_to_the_same_level_is_the_identity(device, backend, dtype, schedule):
    x = torch.randn(4, 1, 2, 13, generator=_gen(4)).to(dtype).to(device)
    x[0, 0, 0, :3] = torch.tensor([-0.0, 0.0, -1e-3])
    level = 0.4269088932128333
    for start, end in ((level, level), (torch.full((4,), level, device=device),) * 2):
        for extra in ({"seed": 123}, {"noise": torch.randn(x.shape, generator=_gen(5)).to(dtype).to(device)}):
            out = fastsearch.renoise(x, start, end, schedule=schedule, backend=backend, **extra)
            assert torch.equal(_bits(out), _bits(x)), (out - x).abs().max()
    # per sample: equal levels keep their sample, the others move
    start = torch.tensor([0.2, 0.5, 0.5, 0.7], device=device)
    end = torch.tensor([0.2, 0.6, 0.5, 0.7], device=device) if schedule == "flow" else \
        torch.tensor([0.2, 0.4, 0.5, 0.7], device=device)
    out = fastsearch.renoise(x, start, end, schedule=schedule, seed=1, backend=backend)
    same = [0, 2, 3]
    assert torch.equal(_bits(out[same]), _bits(x[same]))
    assert not torch.equal(out[1], x[1])


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_renoise_between_nearby_levels_is_accurate(device, backend, schedule):
    """The noise coefficient sqrt(variance difference) to fp32 accuracy, however close the levels."""
    base = torch.tensor(0.4269088932128333, dtype=torch.float32)
    steps = torch.tensor([1, 2, 5, 40, 1000, 100000])
    direction = torch.tensor(1.0) if schedule == "flow" else torch.tensor(0.0)
    near = [base]
    for _ in range(int(steps.max())):
        near.append(torch.nextafter(near[-1], direction))
    start = base.expand(len(steps)).clone()
    end = torch.stack([near[int(k)] for k in steps])
    x = torch.zeros(len(steps), 8, device=device)
    noise = torch.ones(len(steps), 8, device=device)
    out = fastsearch.renoise(x, start.to(device), end.to(device), schedule=schedule, noise=noise, backend=backend)
    f, t = start.double(), end.double()
    if schedule == "vp":
        exact = torch.sqrt(1 - t / f)
    else:
        c = (1 - t) / (1 - f)
        exact = torch.sqrt(t * t - c * c * f * f)
    rel = ((out[:, 0].double().cpu() - exact) / exact).abs()
    assert float(rel.max()) < 1e-5, rel
    assert bool((out == out[:, :1]).all())


# -- 7. clear errors, valid requests accepted ----------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_randn_of_a_0d_shape(device, backend):
    out = fastsearch.randn((), seed=0, device=device, backend=backend)
    assert out.shape == () and out.dtype == torch.float32
    first = fastsearch.randn((1,), seed=0, device=device, backend=backend)
    torch.testing.assert_close(out, first[0])
    into = torch.empty((), device=device, dtype=torch.float16)
    assert fastsearch.randn((), seed=0, out=into, backend=backend) is into
    torch.testing.assert_close(into, first[0].half())


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_randn_shape_errors_name_the_shape(device, backend):
    with pytest.raises(ValueError, match=r"shape \[1099511627776, 1099511627776\] has .* more than an int64"):
        fastsearch.randn((2**40, 2**40), seed=0, device=device, backend=backend)
    with pytest.raises(ValueError, match="shape must hold sizes >= 0"):
        fastsearch.randn((3, -1), seed=0, device=device, backend=backend)
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        fastsearch.randn("34", seed=0, device=device, backend=backend)
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        fastsearch.randn((3, 2.5), seed=0, device=device, backend=backend)
    with pytest.raises(ValueError, match="device must name a torch device"):
        fastsearch.randn((3,), seed=0, device="nowhere", backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_zo_neighbors_of_empty_pivots(device, backend):
    for shape in ((0, 4), (2, 0), (0, 3, 5), (3, 0, 2)):
        pivot = torch.randn(shape, device=device)
        out = fastsearch.zo_neighbors(pivot, 3, seed=0, backend=backend)
        assert out.shape == (shape[0], 3) + shape[1:] and out.dtype == pivot.dtype
    with pytest.raises(ValueError, match="at least 2 elements"):
        fastsearch.zo_neighbors(torch.randn(3, 1, device=device), 2, seed=0, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_zo_neighbors_argument_errors(device, backend):
    pivot = torch.randn(2, 4, device=device)
    with pytest.raises(TypeError, match="cos_sim must be a float"):
        fastsearch.zo_neighbors(pivot, 2, cos_sim="0.9", seed=0, backend=backend)
    for cos_sim in (NAN, 1.5):
        with pytest.raises(ValueError, match="cos_sim must be"):
            fastsearch.zo_neighbors(pivot, 2, cos_sim=cos_sim, seed=0, backend=backend)
    with pytest.raises(ValueError, match="num_neighbors=.* more elements than an int64"):
        fastsearch.zo_neighbors(pivot, 2**62, seed=0, backend=backend)
    with pytest.raises(TypeError, match="pivot must be a tensor"):
        fastsearch.zo_neighbors(None, 2, seed=0, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_schedule_argument_errors(device, backend):
    x = torch.randn(2, 4, device=device)
    with pytest.raises(ValueError, match="alpha_prod_t is too large"):
        fastsearch.ddim_step(x, x, 10**400, 0.5, backend=backend)
    with pytest.raises(TypeError, match="sigma must be a float"):
        fastsearch.flow_euler_step(x, x, "0.5", 0.3, backend=backend)


def test_backends_agree_on_every_case_here():
    """One backend raising where another returns is a bug: the same bad calls on every backend, one outcome."""
    x = torch.randn(2, 4)
    cases = [lambda b: fastsearch.ddim_step(x, x, 0.5, 0.6, eta=math.nan, seed=0, backend=b),
             lambda b: fastsearch.randn((), seed=0, backend=b),
             lambda b: fastsearch.randn((4,), seed=0, offset=STREAM_LENGTH - 2, backend=b),
             lambda b: fastsearch.zo_neighbors(torch.zeros(0, 4), 2, seed=0, backend=b),
             lambda b: fastsearch.renoise(x, NAN, 0.5, schedule="flow", seed=0, backend=b),
             lambda b: fastsearch.ddim_step(x, None, 0.5, 0.6, backend=b)]
    for case in cases:
        outcomes = set()
        for _, backend in [p.values for p in ALL_BACKENDS]:
            try:
                case(backend)
                outcomes.add("returned")
            except (TypeError, ValueError) as exc:
                outcomes.add(type(exc).__name__)
        assert len(outcomes) == 1, outcomes
