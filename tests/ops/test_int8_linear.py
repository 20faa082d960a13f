"""int8_linear: the C++ kernel (every ISA this CPU has) against its reference twin, the exact
integer case, the layout, the error against float32, and bad arguments."""

from __future__ import annotations

import pytest
import torch

from edgeplaid import ops
from edgeplaid._native import C
from edgeplaid.ops import reference

SHAPES = [  # (rows, in_features, out_features): tails of every blocking (4 rows, 16 channels, 4 k's, 32 k's)
    (1, 1, 1),
    (3, 7, 5),
    (4, 48, 16),
    (5, 64, 17),
    (65, 255, 48),
    (130, 256, 768),
    (9, 513, 33),
    (200, 96, 80),  # 2 row chunks, 5 blocks: VNNI tiles of 12 rows x 2 blocks and their tails
]


def _inputs(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g)
    other = torch.randn(m, n, generator=g)
    return x, w, b, other


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("post", ["none", "add", "mul"])
def test_matches_reference(cpp_int8_isa, shape, post):
    x, w, b, other = _inputs(*shape)
    q = ops.quantize_weight(w, b)
    got = ops.int8_linear(x, q, post, other, backend="cpp")
    want = ops.int8_linear(x, q, post, other, backend="reference")
    # Same integer sums; the float epilogue may round once differently (a fused multiply-add).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_exact_on_integer_inputs(cpp_int8_isa):
    """Rows and channels whose largest magnitude is 127 quantise to themselves (scale 1): the
    result is the exact integer product."""
    g = torch.Generator().manual_seed(1)
    m, k, n = 37, 70, 45
    x = torch.randint(-127, 128, (m, k), generator=g).float()
    w = torch.randint(-127, 128, (n, k), generator=g).float()
    x[:, 0], w[:, 0] = 127.0, -127.0  # every row and channel reaches 127
    got = ops.int8_linear(x, ops.quantize_weight(w), backend="cpp")
    torch.testing.assert_close(got, (x.double() @ w.double().T).float(), rtol=0, atol=0)


def test_zero_rows_and_channels(cpp_int8_isa):
    x, w, b, _ = _inputs(6, 40, 20)
    x[2] = 0.0
    w[3] = 0.0
    got = ops.int8_linear(x, ops.quantize_weight(w, b), backend="cpp")
    torch.testing.assert_close(got[2], b, rtol=0, atol=0)
    torch.testing.assert_close(got[:, 3], b[3].expand(6), rtol=0, atol=0)


def test_no_rows(cpp_int8_isa):
    _, w, b, _ = _inputs(1, 8, 3)
    got = ops.int8_linear(torch.zeros(0, 8), ops.quantize_weight(w, b), backend="cpp")
    assert got.shape == (0, 3)


def test_error_against_float32(any_backend):
    """Per-row and per-channel int8: each product's error is within a few quantisation steps."""
    x, w, b, _ = _inputs(64, 256, 96, seed=3)
    got = ops.int8_linear(x, ops.quantize_weight(w, b), backend=any_backend)
    exact = x @ w.T + b
    rel = (got - exact).norm() / (exact - b).norm()
    assert rel < 0.02, rel


def test_quantize_rows_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])
    q, scale = reference.quantize_rows(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]
    assert scale.tolist() == [1.0]


@pytest.mark.skipif(C is None, reason="edgeplaid._C is not built")
def test_packed_layout():
    """Block j holds channels [16 j, 16 j + 16); k-quad p of channel n at [j, p, n % 16, :]."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (37, 10), generator=g, dtype=torch.int8)
    packed = torch.from_numpy(C.int8_linear_pack(q.numpy()))
    block = packed.shape[2]
    assert packed.shape == (-(-37 // block), 3, block, 4)
    for n in range(37):
        for i in range(10):
            assert packed[n // block, i // 4, n % block, i % 4] == q[n, i]
    assert int(packed[:, 2, :, 2:].abs().sum()) == 0  # k 10, 11: zero padding


def test_bad_arguments():
    x, w, b, other = _inputs(4, 8, 3)
    q = ops.quantize_weight(w, b)
    with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
        ops.int8_linear(x[:, :7], q)
    with pytest.raises(ValueError, match="x: expected float32 or bfloat16"):
        ops.int8_linear(x.double(), q)
    with pytest.raises(ValueError, match="post: expected one of"):
        ops.int8_linear(x, q, "gelu")
    with pytest.raises(ValueError, match="other: expected a float32 tensor of shape"):
        ops.int8_linear(x, q, "add", other[:, :2])
    with pytest.raises(ValueError, match="other: expected"):
        ops.int8_linear(x, q, "mul")
    with pytest.raises(TypeError, match="weight: expected an Int8Weight"):
        ops.int8_linear(x, w)
    with pytest.raises(ValueError, match="weight: expected a non-empty 2-D tensor"):
        ops.quantize_weight(torch.zeros(3))
    with pytest.raises(ValueError, match=r"bias: expected shape \(3,\)"):
        ops.quantize_weight(w, torch.zeros(4))


@pytest.mark.skipif(C is None, reason="edgeplaid._C is not built")
def test_binding_checks_the_packed_weights():
    x, w, b, _ = _inputs(4, 8, 3)
    blocks, scale, bias = ops.quantize_weight(w, b).packed
    with pytest.raises(ValueError, match="packed: expected size 2"):
        C.int8_linear(x.numpy(), blocks[:, :1].contiguous().numpy(), scale.numpy(), bias.numpy(), 3)
    with pytest.raises(ValueError, match="out_features"):
        C.int8_linear(x.numpy(), blocks.numpy(), scale.numpy(), bias.numpy(), 40)
    with pytest.raises(ValueError, match="scales: expected size"):
        C.int8_linear(x.numpy(), blocks.numpy(), scale[:3].contiguous().numpy(), bias.numpy(), 3)
    with pytest.raises(ValueError, match="post: expected 'none', 'add', 'mul' or 'geglu'"):
        C.int8_linear(x.numpy(), blocks.numpy(), scale.numpy(), bias.numpy(), 3, "gelu")


# ---- smoothing (SmoothQuant's per-channel factors) ----------------------------------------------


def _outlier_inputs(m: int, k: int, n: int, seed: int = 3):
    """Activations with two channels 20x the others (as BERT's layer norms make them)."""
    x, w, b, other = _inputs(m, k, n, seed)
    x[:, 1] *= 20.0
    x[:, k // 2] *= -20.0
    return x, w, b, other


@pytest.mark.parametrize("shape", [(3, 7, 5), (65, 255, 48), (200, 96, 80)])
@pytest.mark.parametrize("post", ["none", "add"])
def test_smoothing_matches_reference(cpp_int8_isa, shape, post):
    x, w, b, other = _outlier_inputs(*shape)
    s = ops.smooth_factors(x.abs().amax(0), w)
    q = ops.quantize_weight(w, b, smooth=s)
    got = ops.int8_linear(x, q, post, other, backend="cpp")
    want = ops.int8_linear(x, q, post, other, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_smoothing_keeps_the_product_and_cuts_the_error(any_backend):
    x, w, b, _ = _outlier_inputs(64, 256, 96)
    exact = x @ w.T + b
    plain = ops.int8_linear(x, ops.quantize_weight(w, b), backend=any_backend)
    smoothed = ops.int8_linear(
        x, ops.quantize_weight(w, b, smooth=ops.smooth_factors(x.abs().amax(0), w)), backend=any_backend
    )
    err_plain = (plain - exact).norm() / exact.norm()
    err_smoothed = (smoothed - exact).norm() / exact.norm()
    assert err_smoothed < 0.01
    assert err_smoothed < 0.5 * err_plain  # the outliers no longer set each row's scale alone


def test_smooth_factors():
    w = torch.tensor([[1.0, -4.0, 0.0, 2.0], [0.5, 1.0, 0.0, -8.0]])
    amax = torch.tensor([4.0, 1.0, 3.0, 0.0])
    s = ops.smooth_factors(amax, w, alpha=0.5)
    # s = sqrt(amax / wmax) where both are non-zero; 1 where either is zero
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(ops.smooth_factors(amax, w, alpha=1.0)[:2], torch.tensor([4.0, 1.0]))
    with pytest.raises(ValueError, match="alpha: expected a value in"):
        ops.smooth_factors(amax, w, alpha=1.5)
    with pytest.raises(ValueError, match=r"act_amax: expected shape \(4,\)"):
        ops.smooth_factors(amax[:3], w)


def test_bad_smoothing_arguments():
    _, w, b, _ = _inputs(4, 8, 3)
    with pytest.raises(ValueError, match=r"smooth: expected \(8,\) positive finite factors"):
        ops.quantize_weight(w, b, smooth=torch.ones(7))
    with pytest.raises(ValueError, match="smooth: expected"):
        ops.quantize_weight(w, b, smooth=torch.zeros(8))
    with pytest.raises(ValueError, match="smooth: expected"):
        ops.quantize_weight(w, b, smooth=torch.full((8,), float("nan")))


@pytest.mark.skipif(C is None, reason="edgeplaid._C is not built")
def test_binding_checks_inv_smooth():
    x, w, b, _ = _inputs(4, 8, 3)
    args = (x.numpy(), *(t.numpy() for t in ops.quantize_weight(w, b).packed), 3, "none", None)
    with pytest.raises(ValueError, match="inv_smooth: expected size 8"):
        C.int8_linear(*args, torch.ones(7).numpy())
    with pytest.raises(ValueError, match="inv_smooth: expected float32"):
        C.int8_linear(*args, torch.ones(8).double().numpy())


# ---- bf16 inputs and outputs (a bf16 model's layers) -------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7, 5), (65, 255, 48), (200, 96, 80)])
@pytest.mark.parametrize("post", ["none", "add", "mul"])
@pytest.mark.parametrize("smooth", [False, True])
def test_bf16_matches_reference(cpp_int8_isa, shape, post, smooth):
    x, w, b, other = _outlier_inputs(*shape) if smooth else _inputs(*shape)
    x, other = x.bfloat16(), other.bfloat16()
    s = ops.smooth_factors(x.float().abs().amax(0), w) if smooth else None
    q = ops.quantize_weight(w, b, smooth=s)
    got = ops.int8_linear(x, q, post, other, backend="cpp")
    want = ops.int8_linear(x, q, post, other, backend="reference")
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    # Same float32 y up to a fused multiply-add, rounded to bf16 once: at most one bf16 step apart.
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-5)
    wide = ops.int8_linear(x.float(), q, post, other.float(), backend="cpp").bfloat16()
    assert float((got.float() != wide.float()).float().mean()) < 0.01  # the widened input's, rounded


def test_bf16_rounds_to_nearest_even(any_backend):
    """Exact integer products whose bf16 rounding is a tie: rounded to the even neighbour."""
    x = torch.tensor([[127.0, 0.0], [127.0, 1.0]])  # scale 1: exact
    w = torch.tensor([[127.0, 0.0], [127.0, 127.0]])  # scale 1
    b = torch.tensor([0.5, 0.0])  # 16129.5 -> 16128 (even); 16256 exact
    y = ops.int8_linear(x.bfloat16(), ops.quantize_weight(w, b), backend=any_backend)
    assert y.dtype == torch.bfloat16
    assert y.float().tolist() == [[16128.0, 16128.0], [16128.0, 16256.0]]


def test_bf16_bad_arguments():
    x, w, b, other = _inputs(4, 8, 3)
    q = ops.quantize_weight(w, b)
    with pytest.raises(ValueError, match="other: expected a bfloat16 tensor"):
        ops.int8_linear(x.bfloat16(), q, "add", other)
    with pytest.raises(ValueError, match="x: expected float32 or bfloat16"):
        ops.int8_linear(x.half(), q)


# ---- geglu: ModernBERT's MLP input, GELU(first half) * second half, in one call -----------------


@pytest.mark.parametrize("shape", [(3, 7, 32), (65, 255, 96), (200, 96, 64), (9, 40, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_matches_reference(cpp_int8_isa, shape, dtype):
    """Halves of whole column blocks in the kernel (32, 96, 64 channels); 6 channels take the
    unfused path (a product, then GELU * gate in torch)."""
    x, w, b, _ = _inputs(*shape)
    q = ops.quantize_weight(w, b, smooth=ops.smooth_factors(x.abs().amax(0), w))
    got = ops.int8_linear(x.to(dtype), q, "geglu", backend="cpp")
    want = ops.int8_linear(x.to(dtype), q, "geglu", backend="reference")
    assert got.shape == (shape[0], shape[2] // 2) and got.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-4}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype == torch.float32:  # the twin is the product's halves through torch's GELU
        y = ops.int8_linear(x, q, backend="reference")
        gelu_b = torch.nn.functional.gelu(y[:, : shape[2] // 2]) * y[:, shape[2] // 2 :]
        torch.testing.assert_close(want, gelu_b, rtol=0, atol=0)


def test_geglu_bad_arguments():
    x, w, b, _ = _inputs(4, 8, 7)
    with pytest.raises(ValueError, match="weight: 'geglu' needs an even out_features"):
        ops.int8_linear(x, ops.quantize_weight(w, b), "geglu")


@pytest.mark.skipif(C is None, reason="edgeplaid._C is not built")
def test_binding_checks_geglu_blocks():
    x, w, b, _ = _inputs(4, 8, 6)
    args = (x.numpy(), *(t.numpy() for t in ops.quantize_weight(w, b).packed), 6, "geglu")
    with pytest.raises(ValueError, match="out_features: 'geglu' takes both halves' column blocks"):
        C.int8_linear(*args)


# ---- the fused layer norm and the Hadamard rotation ---------------------------------------------


def _one_step(x: torch.Tensor, w: torch.Tensor) -> float:
    """The most one activation's rounding across a .5 can move an output: sx · amax_w (the twin
    and the kernel may sum a row's norm or rotation in another order)."""
    return 2.0 * float(x.abs().amax()) / 127.0 * float(w.abs().amax()) + 1e-5


@pytest.mark.parametrize("shape", [(3, 7, 5), (65, 255, 48), (200, 96, 80), (130, 256, 768)])
@pytest.mark.parametrize("post", ["none", "add", "geglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", ["weight", "weight+bias"])
def test_norm_matches_reference(cpp_int8_isa, shape, post, dtype, affine):
    m, k, n = shape
    if post == "geglu" and n % 32:
        n = 32 * max(1, n // 32)
    x, w, b, other = _inputs(m, k, n)
    x, other = (x * 3 + 1).to(dtype), other.to(dtype)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(k, generator=g) if affine == "weight+bias" else None
    norm = (torch.rand(k, generator=g) + 0.5, bias, 1e-5)
    q = ops.quantize_weight(w, b, smooth=torch.rand(k, generator=g) + 0.5)
    got = ops.int8_linear(x, q, post, other, norm=norm, backend="cpp").float()
    want = ops.int8_linear(x, q, post, other, norm=norm, backend="reference").float()
    normed = torch.nn.functional.layer_norm(x.float(), (k,), *norm)
    step = _one_step(normed, w) * (4.0 if post == "geglu" else 1.0)
    torch.testing.assert_close(got, want, rtol=8e-3 if dtype == torch.bfloat16 else 1e-5, atol=step)
    # The twin is the unfused computation: the layer norm in float32, then the plain op.
    if dtype == torch.float32:
        unfused = ops.int8_linear(normed, q, post, other, backend="reference")
        torch.testing.assert_close(want, unfused, rtol=1e-5, atol=step)


def test_norm_is_closer_to_float32_than_a_rounded_bf16_norm(any_backend):
    """The fused norm is never rounded to bf16: its int8 output is at least as close to the float32
    layer as int8 on torch's bf16 layer norm output."""
    x, w, b, _ = _inputs(300, 256, 64, seed=4)
    x = (x * 2 + 0.5).bfloat16()
    nw = torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.5
    q = ops.quantize_weight(w, b)
    exact = torch.nn.functional.layer_norm(x.float(), (256,), nw) @ w.T + b
    fused = ops.int8_linear(x, q, norm=(nw, None, 1e-5), backend=any_backend).float()
    normed = torch.nn.functional.layer_norm(x, (256,), nw.bfloat16())
    rounded = ops.int8_linear(normed, q, backend=any_backend).float()
    assert float((fused - exact).pow(2).mean()) <= float((rounded - exact).pow(2).mean()) * 1.05


@pytest.mark.parametrize("shape", [(3, 64, 5), (65, 256, 48), (200, 384, 256), (9, 576, 33)])
@pytest.mark.parametrize("rotate", [2, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_matches_reference(cpp_int8_isa, shape, rotate, dtype):
    m, k, n = shape
    x, w, b, other = _outlier_inputs(m, k, n)
    x, other = x.to(dtype), other.to(dtype)
    q = ops.quantize_weight(w, b, rotate=rotate)
    assert q.rotate == rotate
    got = ops.int8_linear(x, q, "add", other, backend="cpp").float()
    want = ops.int8_linear(x, q, "add", other, backend="reference").float()
    step = _one_step(reference.hadamard_blocks(x.float(), rotate), q.qweight.float() * q.scale[:, None])
    torch.testing.assert_close(got, want, rtol=8e-3 if dtype == torch.bfloat16 else 1e-5, atol=step)


def test_rotation_keeps_the_product_and_cuts_the_error(any_backend):
    """Rotated rows and weights multiply to the same product (H H = b I); on rows with one large
    element the int8 error falls several-fold (the small elements keep their levels)."""
    x, w, b, _ = _outlier_inputs(300, 384, 96)
    x[:, 11] *= 30.0  # a per-token spike, as GELU(a) * b's tail
    exact = x @ w.T + b
    plain = ops.int8_linear(x, ops.quantize_weight(w, b), backend=any_backend)
    rotated = ops.int8_linear(x, ops.quantize_weight(w, b, rotate=64), backend=any_backend)
    assert float((rotated - exact).pow(2).mean()) < 0.3 * float((plain - exact).pow(2).mean())
    h = reference.hadamard_blocks(reference.hadamard_blocks(x, 64), 64)
    torch.testing.assert_close(h, 64 * x, rtol=1e-5, atol=1e-3)


def test_bad_norm_and_rotate_arguments():
    x, w, b, _ = _inputs(4, 64, 8)
    q = ops.quantize_weight(w, b)
    for bad in (3, 48, 128, -2, 1, True, 2.0):
        with pytest.raises(ValueError, match="rotate: expected 0 or a power of two"):
            ops.quantize_weight(w, b, rotate=bad)
    with pytest.raises(ValueError, match=r"norm: expected a weight of shape \(64,\)"):
        ops.int8_linear(x, q, norm=(torch.ones(63), None, 1e-5))
    with pytest.raises(ValueError, match=r"norm: expected a bias of shape \(64,\)"):
        ops.int8_linear(x, q, norm=(torch.ones(64), torch.ones(2), 1e-5))
    with pytest.raises(ValueError, match="norm: expected eps a non-negative number"):
        ops.int8_linear(x, q, norm=(torch.ones(64), None, -1.0))
    with pytest.raises(ValueError, match="norm: expected a tuple"):
        ops.int8_linear(x, q, norm=torch.ones(64))


@pytest.mark.skipif(C is None, reason="edgeplaid._C is not built")
def test_binding_checks_norm_and_rotate():
    x, w, b, _ = _inputs(4, 8, 3)
    args = (x.numpy(), *(t.numpy() for t in ops.quantize_weight(w, b).packed), 3, "none", None, None)
    with pytest.raises(ValueError, match="norm_weight: expected size 8"):
        C.int8_linear(*args, torch.ones(7).numpy())
    with pytest.raises(ValueError, match="norm_bias: given without norm_weight"):
        C.int8_linear(*args, None, torch.ones(8).numpy())
    with pytest.raises(ValueError, match="norm_eps: expected a non-negative number"):
        C.int8_linear(*args, torch.ones(8).numpy(), None, -1.0)
    with pytest.raises(ValueError, match="rotate: expected 0 or a power of two"):
        C.int8_linear(*args, None, None, 1e-5, 3)
    with pytest.raises(ValueError, match="rotate: expected 0 or a power of two"):
        C.int8_linear(*args, None, None, 1e-5, 16)
