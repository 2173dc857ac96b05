# SPDX-License-Identifier: Apache-2.0
"""fake_quantize (affine, STE / LSQ) and fake_quantize_4bit: equal to PyTorch's fake-quant ops and to
dequantize_4bit(quantize_4bit(x)) bit for bit, gradients against PyTorch's learnable ops and the float64 reference,
bad input, registration (opcheck, torch.compile) and CUDA equality."""

import random

import pytest
import torch

import fourbit
from fourbit import reference
from conftest import BLOCKSIZES, DTYPES, dtype_id, requires_gpu

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
RANGES = [(-128, 127), (0, 255), (-8, 7), (0, 15), (-1, 1), (-3, 60)]


def _random_case(rng, dtype):
    dims = rng.randint(1, 4)
    shape = tuple(rng.randint(1, 9) * rng.choice([1, 2, 4]) for _ in range(dims))
    qmin, qmax = rng.choice(RANGES)
    spread = rng.choice([0.5, 3.0, 40.0])
    x = (torch.randn(shape) * spread).to(dtype)
    return x, qmin, qmax, spread


def _scale(size, spread, qmin, qmax):
    # Scales around the range's natural step, some so small that values clip.
    return (torch.rand(size) * 1.5 + 0.05) * spread * 2 / (qmax - qmin)


def _tie_values(x, scale):
    """Puts exact rounding ties (k + 0.5 steps) into x, where round-half-to-even matters."""
    flat = x.reshape(-1)
    flat[::5] = ((torch.randint(-20, 20, flat[::5].shape).float() + 0.5) * scale.reshape(-1)[0]).to(x.dtype)
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_per_tensor_equals_torch(cpu_isa, dtype):
    rng = random.Random(1)
    for _ in range(15):
        x, qmin, qmax, spread = _random_case(rng, dtype)
        scale = _scale(1, spread, qmin, qmax)
        zp = rng.randint(qmin, qmax)
        x = _tie_values(x, scale)
        expected = torch.fake_quantize_per_tensor_affine(x, float(scale), zp, qmin, qmax)
        got = fourbit.fake_quantize(x, scale, torch.tensor(zp), qmin, qmax)
        assert got.dtype == dtype and torch.equal(got, expected), (x.shape, qmin, qmax)
        # A float zero point holding an integer, and a Python scale: the same.
        assert torch.equal(fourbit.fake_quantize(x, float(scale), torch.tensor(float(zp)), qmin, qmax), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_per_channel_equals_torch(cpu_isa, dtype):
    rng = random.Random(2)
    for _ in range(15):
        x, qmin, qmax, spread = _random_case(rng, dtype)
        axis = rng.randrange(-x.dim(), x.dim())
        channels = x.shape[axis]
        scale = _scale(channels, spread, qmin, qmax)
        zp = torch.randint(qmin, qmax + 1, (channels,), dtype=torch.int32)
        expected = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)
        got = fourbit.fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
        assert torch.equal(got, expected), (x.shape, axis, qmin, qmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_per_group_equals_torch_per_channel_over_groups(cpu_isa, dtype):
    # Groups of g along the last dim = channels of x viewed as [groups, g] along axis 0.
    rng = random.Random(3)
    for _ in range(15):
        lead = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 2)))
        g = rng.choice([1, 2, 8, 32, 64])
        k = g * rng.randint(1, 5)
        qmin, qmax = rng.choice(RANGES)
        x = (torch.randn(*lead, k) * 4).to(dtype)
        groups = x.numel() // g
        scale = _scale(groups, 4.0, qmin, qmax).reshape(*lead, k // g)
        zp = torch.randint(qmin, qmax + 1, scale.shape, dtype=torch.int32)
        expected = torch.fake_quantize_per_channel_affine(
            x.reshape(groups, g), scale.reshape(-1), zp.reshape(-1), 0, qmin, qmax
        ).reshape(x.shape)
        got = fourbit.fake_quantize(x, scale, zp, qmin, qmax, group_size=g)
        assert torch.equal(got, expected), (x.shape, g)
        assert torch.equal(got, reference.fake_quantize_affine(x, scale, zp, qmin, qmax, group_size=g))


def test_non_contiguous_and_thread_counts_give_the_same_bits():
    x = torch.randn(64, 300)[:, ::3] * 5
    scale = torch.rand(64) * 0.1 + 0.01
    zp = torch.randint(-10, 10, (64,))
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp.int(), 0, -128, 127)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(fourbit.fake_quantize(x, scale, zp, -128, 127, axis=0), expected)
    finally:
        torch.set_num_threads(threads)


def test_nan_and_inf_follow_torch_per_tensor():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 1e30, -1e30])
    expected = torch.fake_quantize_per_tensor_affine(x, 0.1, 3, -8, 7)
    assert torch.equal(fourbit.fake_quantize(x, 0.1, 3, -8, 7), expected)


# ---------------------------------------------------------------------------------------------------- gradients
def test_straight_through_gradient():
    x = (torch.randn(40, 32) * 2).requires_grad_()
    scale, zp = torch.tensor(0.1), torch.tensor(2)
    y = fourbit.fake_quantize(x, scale, zp, -8, 7)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = x.detach().requires_grad_()
    torch.fake_quantize_per_tensor_affine(ref, 0.1, 2, -8, 7).backward(grad)
    assert torch.equal(x.grad, ref.grad)
    assert 0 < (x.grad == 0).float().mean() < 1  # some elements clipped, some not


@pytest.mark.parametrize("grad_factor", [1.0, 0.37])
def test_learnable_per_tensor_matches_torch(grad_factor):
    rng = random.Random(4)
    for _ in range(10):
        x, qmin, qmax, spread = _random_case(rng, torch.float32)
        scale = _scale(1, spread, qmin, qmax).requires_grad_()
        zp = torch.tensor([float(rng.randint(qmin, qmax))], requires_grad=True)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        grad = torch.randn(x.shape)
        ours = fourbit.fake_quantize(xs[0], scale, zp, qmin, qmax, grad_factor=grad_factor)
        ours.backward(grad)
        got = (xs[0].grad, scale.grad.clone(), zp.grad.clone())
        scale.grad = zp.grad = None
        if zp.item() >= 0:
            theirs = torch._fake_quantize_learnable_per_tensor_affine(xs[1], scale, zp, qmin, qmax, grad_factor)
        else:
            # PyTorch's per-tensor backward rounds the zero point with int(zp + 0.5), which truncates toward zero:
            # a zero point of -3 becomes -2 there (its forward and its per-channel op use -3). Compare with the
            # per-channel op over one channel instead, which rounds consistently.
            theirs = torch._fake_quantize_learnable_per_channel_affine(
                xs[1].unsqueeze(0), scale, zp, 0, qmin, qmax, grad_factor
            ).squeeze(0)
        theirs.backward(grad)
        assert torch.equal(ours, theirs)
        torch.testing.assert_close(got[0], xs[1].grad)
        torch.testing.assert_close(got[1], scale.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[2], zp.grad, rtol=1e-4, atol=1e-4)
        scale.grad = zp.grad = None


@pytest.mark.parametrize("grad_factor", [1.0, 0.5])
def test_learnable_per_channel_matches_torch(grad_factor):
    rng = random.Random(5)
    for _ in range(10):
        x, qmin, qmax, spread = _random_case(rng, torch.float32)
        if x.dim() == 1:
            x = x.unsqueeze(0)  # PyTorch's per-channel learnable backward returns a wrongly shaped grad for 1-D x
        axis = rng.randrange(x.dim())
        channels = x.shape[axis]
        scale = _scale(channels, spread, qmin, qmax).requires_grad_()
        zp = torch.randint(qmin, qmax + 1, (channels,)).float().requires_grad_()
        xs = [x.clone().requires_grad_() for _ in range(2)]
        grad = torch.randn(x.shape)
        ours = fourbit.fake_quantize(xs[0], scale, zp, qmin, qmax, axis=axis, grad_factor=grad_factor)
        ours.backward(grad)
        got = (xs[0].grad, scale.grad.clone(), zp.grad.clone())
        scale.grad = zp.grad = None
        theirs = torch._fake_quantize_learnable_per_channel_affine(xs[1], scale, zp, axis, qmin, qmax, grad_factor)
        theirs.backward(grad)
        assert torch.equal(ours, theirs)
        torch.testing.assert_close(got[0], xs[1].grad)
        torch.testing.assert_close(got[1], scale.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[2], zp.grad, rtol=1e-4, atol=1e-4)
        scale.grad = zp.grad = None


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_learnable_gradients_float64_match_reference_autograd(granularity):
    """The LSQ backward kernel against autograd through the straight-through reference, in float64 (tight)."""
    torch.manual_seed(6)
    x = torch.randn(6, 5, 16, dtype=torch.float64) * 3
    kwargs, size = {}, (1,)
    if granularity == "channel":
        kwargs, size = {"axis": 1}, (5,)
    elif granularity == "group":
        kwargs, size = {"group_size": 4}, (6, 5, 4)
    scale = (torch.rand(size, dtype=torch.float64) * 0.5 + 0.2).requires_grad_()
    zp = torch.randint(-3, 4, size).double().requires_grad_()
    grad = torch.randn_like(x)
    x1 = x.clone().requires_grad_()
    y = fourbit.fake_quantize(x1, scale, zp, -8, 7, grad_factor=0.25, **kwargs)
    gx, gs, gz = torch.autograd.grad(y, (x1, scale, zp), grad)
    x2 = x.clone().requires_grad_()
    y_ref = reference.fake_quantize_affine(x2, scale, zp, -8, 7, **kwargs)
    rx, rs, rz = torch.autograd.grad(y_ref, (x2, scale, zp), grad)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)  # the reference multiplies by s and 1/s
    torch.testing.assert_close(gs, rs * 0.25, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, rz * 0.25, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, size", [({}, (1,)), ({"axis": 0}, (4,)), ({"group_size": 4}, (4, 2))])
def test_gradcheck_scale_on_clipped_values_float64(kwargs, size):
    """torch.autograd.gradcheck of the learnable path in float64 where it is a true derivative: on values outside the
    clamp range y = (bound - zero_point) * scale is linear in scale (and constant in x), so numerical and LSQ
    gradients must agree. (Inside the range the rounding makes the numerical gradient ``round(x/s)`` while LSQ's is
    ``round(x/s) - x/s`` by design; that branch is checked against the straight-through reference above.)"""
    sign = torch.where(torch.rand(4, 8) < 0.5, -1.0, 1.0).double()
    x = (sign * (torch.rand(4, 8, dtype=torch.float64) * 5 + 20)).requires_grad_()
    scale = (torch.rand(size, dtype=torch.float64) * 0.5 + 0.5).requires_grad_()
    zp = torch.randint(-2, 3, size).double()
    fn = lambda xx, s: fourbit.fake_quantize(xx, s, zp, -8, 7, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, scale))


# ---------------------------------------------------------------------------------------------------- 4-bit
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_fake_quantize_4bit_equals_quantize_dequantize(cpu_isa, dtype, quant_type, nested):
    for shape, blocksize in [((1,), 64), ((7, 63), 32), ((33, 130), 64), ((2, 3, 1000), 256), ((5, 4096), 4096)]:
        x = (torch.randn(shape) * 3).to(dtype)
        x.reshape(-1)[::13] = 0
        packed, state = fourbit.quantize_4bit(x, blocksize, quant_type, compress_statistics=nested)
        expected = fourbit.dequantize_4bit(packed, state)
        got = fourbit.fake_quantize_4bit(x, quant_type, blocksize, compress_statistics=nested)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, expected), (shape, blocksize)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_fake_quantize_4bit_every_blocksize_zero_blocks_and_nan(blocksize):
    x = torch.randn(3, 2 * blocksize + 17)
    x[0, :blocksize] = 0  # an all-zero block
    x[1, 5] = float("nan")
    x = x[:, 1:]  # non-contiguous
    for nested in (False, True):
        got = fourbit.fake_quantize_4bit(x, "nf4", blocksize, nested)
        expected = fourbit.dequantize_4bit(*fourbit.quantize_4bit(x, blocksize, "nf4", compress_statistics=nested))
        assert torch.equal(torch.isnan(got), torch.isnan(expected))
        assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))


def test_fake_quantize_4bit_identity_gradient():
    x = torch.randn(16, 64, requires_grad=True)
    grad = torch.randn(16, 64)
    fourbit.fake_quantize_4bit(x, "fp4", 32, True).backward(grad)
    assert torch.equal(x.grad, grad)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": torch.tensor(0.0)}, "scale must be positive and finite"),
        ({"scale": torch.tensor(-1.0)}, "scale must be positive and finite"),
        ({"scale": torch.tensor(float("nan"))}, "scale must be positive and finite"),
        ({"scale": torch.tensor(float("inf"))}, "scale must be positive and finite"),
        ({"zero_point": torch.tensor(float("nan"))}, "zero_point must be finite"),
        ({"quant_min": 5, "quant_max": 5}, "quant_min must be less than quant_max"),
        ({"quant_min": 7, "quant_max": -8}, "quant_min must be less than quant_max, got quant_min=7"),
        ({"axis": 2, "scale": torch.ones(3), "zero_point": torch.zeros(3)}, "axis must be in \\[-2, 2\\)"),
        ({"axis": -3, "scale": torch.ones(3), "zero_point": torch.zeros(3)}, "got -3"),
        ({"group_size": 5, "scale": torch.ones(3), "zero_point": torch.zeros(3)}, "group_size must be positive and divide"),
        ({"group_size": 0}, "group_size must be positive"),
        ({"axis": 0}, "scale must hold one value per channel .* = 4, got shape"),
        ({"group_size": 8, "scale": torch.ones(3)}, "scale must hold one value per group .* = 8, got shape"),
        ({"scale": torch.ones(2)}, "scale must hold 1 value \\(per tensor\\), got shape"),
        ({"zero_point": torch.zeros(2, dtype=torch.int32)}, "zero_point must have scale's 1 values"),
        ({"axis": 0, "group_size": 8}, "not both"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = {"x": torch.randn(4, 16), "scale": torch.tensor(0.1), "zero_point": torch.tensor(0), "quant_min": -8,
            "quant_max": 7}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fourbit.fake_quantize(**args)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64, got"):
        fourbit.fake_quantize(torch.ones(4, dtype=torch.int32), 0.1, 0, -8, 7)
    with pytest.raises(TypeError, match="scale must be a float tensor"):
        fourbit.fake_quantize(torch.ones(4), torch.tensor(1), 0, -8, 7)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fourbit.fake_quantize([1.0], 0.1, 0, -8, 7)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        fourbit.fake_quantize_4bit(torch.ones(64), "nf4", 48)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        fourbit.fake_quantize_4bit(torch.ones(64), "int4")


# ---------------------------------------------------------------------------------------------------- registration
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck_fake_quantize_affine(dtype):
    x = (torch.randn(6, 32) * 3).to(dtype)
    op = torch.ops.fourbit.fake_quantize_affine.default
    cases = [
        (x, torch.tensor(0.1), torch.tensor(3), -8, 7),
        (x, torch.rand(6) + 0.05, torch.randint(0, 15, (6,)), 0, 15, 0),
        (x, torch.rand(6, 4) + 0.05, torch.zeros(6, 4), -128, 127, None, 8, 0.5),
    ]
    for args in cases:
        torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)
    learnable = (x.float().requires_grad_(), (torch.rand(6) + 0.05).requires_grad_(),
                 torch.randint(0, 15, (6,)).float().requires_grad_(), 0, 15, 0, None, 0.3)  # fmt: skip
    torch.library.opcheck(op, learnable, test_utils=OPCHECK_TESTS)
    torch.library.opcheck(
        torch.ops.fourbit.fake_quantize_affine_backward.default,
        (torch.randn(6, 32), x.float(), torch.rand(6) + 0.05, torch.zeros(6), -8, 7, 0, None, 1.0, True),
        test_utils=OPCHECK_TESTS,
    )


@pytest.mark.parametrize("nested", [False, True])
def test_opcheck_fake_quantize_4bit(nested):
    x = torch.randn(33, 65, requires_grad=True)
    torch.library.opcheck(torch.ops.fourbit.fake_quantize_4bit.default, (x, 64, "nf4", nested, 256),
                          test_utils=OPCHECK_TESTS)  # fmt: skip


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    scale = torch.full((8, 4), 0.05, requires_grad=True)

    def step(w):
        y = fourbit.fake_quantize(w, scale, torch.zeros(8, 4), -8, 7, group_size=8, grad_factor=0.1)
        return (fourbit.fake_quantize_4bit(y * 2, "nf4", 32) ** 2).sum()

    w = torch.randn(8, 32, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(w)
    loss.backward()
    g_w, g_s = w.grad.clone(), scale.grad.clone()
    w.grad = scale.grad = None
    assert torch.equal(loss, step(w))
    step(w).backward()
    assert torch.equal(g_w, w.grad) and torch.equal(g_s, scale.grad)


# ---------------------------------------------------------------------------------------------------- CUDA
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_fake_quantize_equals_cpu(dtype):
    x = (torch.randn(37, 64) * 4).to(dtype)
    cases = [
        (torch.tensor(0.1), torch.tensor(3), {}),
        (torch.rand(37) * 0.2 + 0.01, torch.randint(-8, 8, (37,)), {"axis": 0}),
        (torch.rand(64) * 0.2 + 0.01, torch.randint(-8, 8, (64,)), {"axis": -1}),
        (torch.rand(37, 8) * 0.2 + 0.01, torch.randint(-8, 8, (37, 8)), {"group_size": 8}),
    ]
    for scale, zp, kw in cases:
        cpu = fourbit.fake_quantize(x, scale, zp, -8, 7, **kw)
        gpu = fourbit.fake_quantize(x.cuda(), scale.cuda(), zp.cuda(), -8, 7, **kw)
        assert torch.equal(gpu.cpu(), cpu)
        s1, z1 = scale.clone().requires_grad_(), zp.float().requires_grad_()
        s2, z2 = scale.cuda().requires_grad_(), zp.float().cuda().requires_grad_()
        g = torch.randn(x.shape).to(dtype)
        x1, x2 = x.clone().requires_grad_(), x.cuda().requires_grad_()
        fourbit.fake_quantize(x1, s1, z1, -8, 7, grad_factor=0.5, **kw).backward(g)
        fourbit.fake_quantize(x2, s2, z2, -8, 7, grad_factor=0.5, **kw).backward(g.cuda())
        assert torch.equal(x2.grad.cpu(), x1.grad)
        torch.testing.assert_close(s2.grad.cpu(), s1.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(z2.grad.cpu(), z1.grad, rtol=1e-4, atol=1e-4)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("nested", [False, True])
def test_cuda_fake_quantize_4bit_equals_cpu(dtype, nested):
    for shape, blocksize in [((1,), 64), ((7, 63), 32), ((33, 130), 64), ((5, 4096 + 3), 4096), ((3, 1000), 512)]:
        x = (torch.randn(shape) * 3).to(dtype)
        for quant_type in ("nf4", "fp4"):
            cpu = fourbit.fake_quantize_4bit(x, quant_type, blocksize, nested)
            gpu = fourbit.fake_quantize_4bit(x.cuda(), quant_type, blocksize, nested)
            assert torch.equal(gpu.cpu(), cpu), (shape, blocksize, quant_type)


@requires_gpu
def test_cuda_bad_scale_gives_nan():
    y = fourbit.fake_quantize(torch.randn(8, device="cuda"), torch.tensor(0.0, device="cuda"), 0, -8, 7)
    assert torch.isnan(y).all()
