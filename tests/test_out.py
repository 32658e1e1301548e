"""out= of the step ops and randn: every backend writes into the given tensors, in place when out is an input,
with the very bits of the allocating call, and refuses a bad out before any kernel runs. (opcheck of the out
variants: tests/test_machinery.py.)"""

import pytest
import torch
from helpers import ALL_BACKENDS, DTYPES

import fastsearch
from fastsearch import _backend

SHAPES = [(3, 4, 17, 19), (1, 5), (5, 3, 7), (4, 1)]
STEPS = ["ddim", "ddim_noise", "euler", "euler_stochastic", "heun", "renoise_vp", "renoise_flow"]


def _tensors(shape, dtype, device, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(count)]


def _levels(batch, low, high, device, seed=0):
    """One level per sample: the per-sample schedules that make search batchable."""
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(batch, generator=g)).to(device)


def _step(name, shape, dtype, device):
    """(data tensors, call(*data, backend=..., out=...)) of one step; data[0] is the sample."""
    batch = shape[0]
    low, high = _levels(batch, 0.2, 0.5, device), _levels(batch, 0.6, 0.9, device, seed=1)
    data = _tensors(shape, dtype, device, 3)
    if name == "ddim":
        return data[:2], lambda x, m, **kw: fastsearch.ddim_step(x, m, low, high, eta=1.0, seed=5,
                                                                 prediction_type="v_prediction", **kw)
    if name == "ddim_noise":
        return data, lambda x, m, z, **kw: fastsearch.ddim_step(x, m, low, 0.95, eta=0.7, noise=z,
                                                                clip_sample_range=1.0, use_clipped_model_output=True,
                                                                **kw)
    if name == "euler":
        return data[:2], lambda x, v, **kw: fastsearch.flow_euler_step(x, v, high, low, **kw)
    if name == "euler_stochastic":
        return data, lambda x, v, z, **kw: fastsearch.flow_euler_step(x, v, high, low, noise=z, stochastic=True, **kw)
    if name == "heun":
        return data, lambda x, v1, v2, **kw: fastsearch.flow_heun_step(x, v1, v2, high, 0.1, **kw)
    if name == "renoise_vp":
        return data[:1], lambda x, **kw: fastsearch.renoise(x, high, low, seed=7, **kw)
    return data[:1], lambda x, **kw: fastsearch.renoise(x, low, high, schedule="flow", seed=7, **kw)


def _outputs(result) -> tuple:
    return tuple(result) if isinstance(result, tuple) else (result,)


def _empty_out(name, sample):
    """Fresh outputs, filled with NaN so that an element the kernel skipped shows."""
    outs = tuple(torch.full_like(sample, float("nan")) for _ in range(2 if name.startswith("ddim") else 1))
    return outs if len(outs) == 2 else outs[0]


def _assert_same_bits(got, expected):
    for g, e in zip(_outputs(got), _outputs(expected), strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g.view(torch.int16 if g.element_size() == 2 else torch.int32),
                           e.view(torch.int16 if e.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", STEPS)
def test_out_gives_the_allocating_result(device, backend, dtype, shape, name):
    data, step = _step(name, shape, dtype, device)
    expected = step(*data, backend=backend)
    out = _empty_out(name, data[0])
    result = step(*data, out=out, backend=backend)
    if isinstance(out, tuple):
        assert type(result) is fastsearch.DDIMStepOutput
        assert result.prev_sample is out[0] and result.pred_original_sample is out[1]
    else:
        assert result is out
    _assert_same_bits(result, expected)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", STEPS)
def test_in_place_on_every_input(device, backend, dtype, shape, name):
    """out may be any one of the tensors the step reads element by element (the sample, as a loop does,
    a model output, a velocity, the noise): the result is the out-of-place one."""
    data, step = _step(name, shape, dtype, device)
    expected = step(*data, backend=backend)
    # DDIM: either output in place, the other in a buffer of its own.
    slots = (0, 1) if name.startswith("ddim") else (None,)
    for index in range(len(data)):
        for slot in slots:
            inputs = [t.clone() for t in data]
            if slot is None:
                out = inputs[index]
            else:
                out = [torch.empty_like(data[0]), torch.empty_like(data[0])]
                out[slot] = inputs[index]
                out = tuple(out)
            result = step(*inputs, out=out, backend=backend)
            assert (result if slot is None else result[slot]) is inputs[index]
            _assert_same_bits(result, expected)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_ddim_in_place_both_outputs(device, backend):
    """prev into the sample and x0 into the model output: the usual loop with no buffer at all."""
    data, step = _step("ddim", (3, 4, 9), torch.float32, device)
    expected = step(*data, backend=backend)
    x, m = (t.clone() for t in data)
    result = step(x, m, out=(x, m), backend=backend)
    assert result.prev_sample is x and result.pred_original_sample is m
    _assert_same_bits(result, expected)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_seeded_noise_is_the_same_with_out(device, backend):
    """The stream position of an element is its flat index, whatever memory receives it."""
    x, v = _tensors((2, 3, 11), torch.float32, device, 2)
    by_noise = fastsearch.flow_euler_step(x, v, 0.7, 0.4, stochastic=True, backend=backend,
                                          noise=fastsearch.randn(x.shape, seed=13, device=device, backend="torch"))
    y = x.clone()
    fastsearch.flow_euler_step(y, v, 0.7, 0.4, stochastic=True, seed=13, out=y, backend=backend)
    torch.testing.assert_close(y, by_noise, atol=1e-5, rtol=1e-5)
    assert torch.equal(y, fastsearch.flow_euler_step(x, v, 0.7, 0.4, stochastic=True, seed=13, backend=backend))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_non_contiguous_inputs_with_out(device, backend):
    """A strided input is copied before the kernel reads it, so out may share its storage."""
    base = torch.randn(6, 5, 4, device=device)
    x = base.transpose(1, 2)[::2]  # [3, 4, 5], not contiguous
    v = torch.randn(3, 4, 5, device=device)
    expected = fastsearch.flow_euler_step(x, v, 0.6, 0.3, backend=backend)
    out = torch.empty(3, 4, 5, device=device)
    assert fastsearch.flow_euler_step(x, v, 0.6, 0.3, out=out, backend=backend) is out
    _assert_same_bits(out, expected)
    storage_view = base[:3].reshape(3, 4, 5)  # contiguous, over memory that x reads with other strides
    fastsearch.flow_euler_step(x, v, 0.6, 0.3, out=storage_view, backend=backend)
    _assert_same_bits(storage_view, expected)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_empty_batch_with_out(device, backend):
    x = torch.empty(0, 3, device=device)
    assert fastsearch.flow_euler_step(x, x, 0.5, 0.4, out=x, backend=backend) is x
    prev, x0 = torch.empty_like(x), torch.empty_like(x)
    assert fastsearch.ddim_step(x, x, 0.5, 0.6, out=(prev, x0), backend=backend).prev_sample is prev


# -- a bad out is refused, before any kernel runs ---------------------------------------------------------


def _bad_out_cases(device):
    """(step name, out, exception, message pattern) for outs that must be refused."""
    good = torch.empty(3, 4, 5, device=device)
    return [
        ("euler", torch.empty(3, 4, 6, device=device), ValueError, "out has shape"),
        ("euler", torch.empty(3, 4, 5, device=device, dtype=torch.float16), TypeError, "out has dtype"),
        ("euler", torch.empty(3, 4, 5, device="meta"), ValueError, "out is on meta"),
        ("euler", torch.empty(3, 5, 4, device=device).transpose(1, 2), ValueError, "out must be contiguous"),
        ("euler", torch.empty(3, 4, 5, device=device).tolist(), TypeError, "out must be a tensor"),
        ("heun", torch.empty(4, 4, 5, device=device), ValueError, "out has shape"),
        ("renoise_flow", torch.empty(3, 4, 5, device=device, dtype=torch.bfloat16), TypeError, "out has dtype"),
        ("renoise_vp", torch.empty(3, 4, 5, device="meta"), ValueError, "out is on meta"),
        ("ddim", good, TypeError, r"out must be a \(prev_sample, pred_original_sample\) pair"),
        ("ddim", (good,), ValueError, "out must hold 2 tensors"),
        ("ddim", (good, torch.empty_like(good), torch.empty_like(good)), ValueError, "out must hold 2 tensors"),
        ("ddim", (good, None), TypeError, r"out\[1\] \(pred_original_sample\) must be a tensor"),
        ("ddim", (good, torch.empty(3, 4, 4, device=device)), ValueError,
         r"out\[1\] \(pred_original_sample\) has shape"),
        ("ddim", (good.half(), torch.empty_like(good)), TypeError, r"out\[0\] \(prev_sample\) has dtype"),
        ("ddim", (good, torch.empty(3, 4, 5, device="meta")), ValueError, r"out\[1\] \(pred_original_sample\) is on"),
        ("ddim", (good, good), ValueError, "must not overlap"),
        ("ddim", (good[:, :2], good[:, 2:]), ValueError, "out.* has shape"),
    ]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_bad_out_is_refused(device, backend):
    for name, out, error, message in _bad_out_cases(device):
        data, step = _step(name, (3, 4, 5), torch.float32, device)
        touched = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
        touched = [t for t in touched if t.device.type != "meta"]
        for t in touched:
            t.fill_(1.0)
        with pytest.raises(error, match=message):
            step(*data, out=out, backend=backend)
        assert all(bool((t == 1.0).all()) for t in touched), f"{name}: out written before the error"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_overlapping_out_is_refused(device, backend):
    """out may be an input itself, but must not overlap one in part, nor a schedule tensor, nor the other
    output: a kernel would read elements it had already written."""
    storage = torch.randn(3 * 20 + 1, device=device)
    x, shifted = storage[:60].view(3, 4, 5), storage[1:].view(3, 4, 5)
    v = torch.randn(3, 4, 5, device=device)
    keep = storage.clone()
    with pytest.raises(ValueError, match="out overlaps sample in part"):
        fastsearch.flow_euler_step(x, v, 0.6, 0.3, out=shifted, backend=backend)
    with pytest.raises(ValueError, match="out overlaps velocity_next in part"):
        fastsearch.flow_heun_step(v, v, x, 0.6, 0.3, out=shifted, backend=backend)
    with pytest.raises(ValueError, match="out overlaps noise in part"):
        fastsearch.renoise(v, 0.6, 0.3, noise=x, out=shifted, backend=backend)
    with pytest.raises(ValueError, match=r"out\[1\] \(pred_original_sample\) overlaps model_output in part"):
        fastsearch.ddim_step(v, x, 0.5, 0.6, out=(torch.empty_like(v), shifted), backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] \(prev_sample\) and out\[1\] \(pred_original_sample\) must not"):
        fastsearch.ddim_step(v, v.clone(), 0.5, 0.6, out=(x, shifted), backend=backend)
    assert torch.equal(storage, keep)

    flat = torch.rand(3 * 20, device=device)
    sigma = flat[:3]  # the per-sample sigmas live inside out
    with pytest.raises(ValueError, match="out overlaps sigma, which the step reads"):
        fastsearch.flow_euler_step(v, v, sigma, 0.1, out=flat.view(3, 4, 5), backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] \(prev_sample\) overlaps alpha_prod_t_prev"):
        fastsearch.ddim_step(v, v, 0.5, flat[5:8], out=(flat.view(3, 4, 5), torch.empty_like(v)), backend=backend)


# -- randn(out=) --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_randn_out(device, backend, dtype):
    expected = fastsearch.randn((3, 7), seed=4, offset=5, device=device, dtype=dtype, backend=backend)
    out = torch.empty(3, 7, device=device, dtype=dtype)
    assert fastsearch.randn((3, 7), seed=4, offset=5, out=out, backend=backend) is out
    _assert_same_bits(out, expected)
    assert fastsearch.randn(out.shape, seed=4, offset=5, device=device, dtype=dtype, out=out, backend=backend) is out


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_randn_bad_out(device, backend):
    out = torch.empty(3, 7, device=device)
    with pytest.raises(ValueError, match="out has shape"):
        fastsearch.randn((7, 3), seed=1, out=out, backend=backend)
    with pytest.raises(TypeError, match="out has dtype"):
        fastsearch.randn((3, 7), seed=1, dtype=torch.float16, out=out, backend=backend)
    with pytest.raises(ValueError, match="out is on"):
        fastsearch.randn((3, 7), seed=1, device="meta", out=out, backend=backend)
    with pytest.raises(ValueError, match="out must be contiguous"):
        fastsearch.randn((3, 7), seed=1, out=torch.empty(7, 3, device=device).t(), backend=backend)
    with pytest.raises(TypeError, match="out must be float32, float16 or bfloat16"):
        fastsearch.randn((3, 7), seed=1, out=torch.empty(3, 7, device=device, dtype=torch.float64), backend=backend)


# -- torch.library and torch.compile --------------------------------------------------------------------------


def test_out_overloads_are_torch_out_variants():
    """torch.compile recognises each .out overload as the out variant of its functional op."""
    to_out_variant = pytest.importorskip("torch._library._out_variant").to_out_variant
    for name in ("ddim_step", "flow_euler_step", "flow_heun_step", "renoise"):
        packet = getattr(torch.ops.fastsearch, name)
        assert to_out_variant(packet.default) == packet.out


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_torch_compile_in_place_loop(device, backend):
    def loop(x, v, sigmas):
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            fastsearch.flow_euler_step(x, v, s, s_next, out=x, backend=backend)
        prev, x0 = fastsearch.ddim_step(x, v, 0.4, 0.7, eta=1.0, seed=2, out=(x, torch.empty_like(x)),
                                        backend=backend)
        return x0 * 2

    x, v = torch.randn(4, 3, 8, device=device), torch.randn(4, 3, 8, device=device)
    sigmas = [torch.rand(4, device=device) for _ in range(3)]
    eager_x, compiled_x = x.clone(), x.clone()
    eager = loop(eager_x, v, sigmas)
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(compiled_x, v, sigmas)
    assert torch.equal(compiled_x, eager_x) and torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if torch.cuda.is_available()
                                     and (_backend.has_cuda() if b == "cuda" else _backend.has_triton("cuda"))])
def test_cuda_graph_replays_the_in_place_step(backend):
    """A captured out= step writes into the same memory on every replay: no allocation in the graph."""
    x = torch.randn(4, 3, 16, 16, device="cuda")
    v = torch.randn_like(x)
    sigma, sigma_next = torch.tensor([0.9, 0.8, 0.7, 0.6], device="cuda"), torch.zeros(4, device="cuda")
    start = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
        fastsearch.flow_euler_step(x, v, sigma, sigma_next, out=x, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fastsearch.flow_euler_step(x, v, sigma, sigma_next, out=x, backend=backend)
    x.copy_(start)
    sigma_next.fill_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    expected = fastsearch.flow_euler_step(start, v, sigma, sigma_next, backend=backend)
    assert torch.equal(x, expected)
