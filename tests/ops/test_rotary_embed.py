"""rotary_embed: the C++ kernel (every ISA this CPU has) against its reference twin and against
transformers' rotate-half formula, in float32 and bf16, on strided views, and bad arguments."""

from __future__ import annotations

import pytest
import torch

from edgeplaid import ops
from edgeplaid.ops import reference

SHAPES = [  # (B, L, G, D): a lone pair, tails of 8 and 16 lanes, the encoders' head dims
    (1, 1, 1, 2),
    (2, 3, 5, 6),
    (3, 7, 4, 18),
    (2, 33, 3, 34),
    (1, 65, 8, 64),
    (4, 20, 6, 48),
]


def _tables(length: int, half: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(length, half, generator=g) * 6.3
    scale = 0.5 + torch.rand(length, half, generator=g)  # attention scaling folded into the tables
    return angle.cos() * scale, angle.sin() * scale


def _x(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(cpp_isa, shape, dtype):
    cos, sin = _tables(shape[1], shape[3] // 2)
    x = _x(shape, dtype)
    want = reference.rotary_embed(x.clone(), cos, sin)
    got = x.clone()
    assert ops.rotary_embed(got, cos, sin, backend="cpp") is got
    if dtype == torch.float32:  # a fused multiply-add may round once differently
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # one rounding to bf16 of float32 values that may differ in their last bit
        ulp = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)
        assert (got != want).float().mean() < 1e-3 and float(ulp.max()) <= 2**-7


def test_reference_is_rotate_half():
    """The interleaved form equals transformers' rotate-half form on the de-interleaved layout."""
    b, length, g, d = 2, 9, 3, 16
    cos, sin = _tables(length, d // 2)
    x = _x((b, length, g, d), torch.float64).float()
    got = reference.rotary_embed(x.clone(), cos, sin)
    halves = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)  # (u_0..u_7, v_0..v_7)
    c = torch.cat([cos, cos], -1)[None, :, None]
    s = torch.cat([sin, sin], -1)[None, :, None]
    rotate_half = torch.cat([-halves[..., d // 2 :], halves[..., : d // 2]], dim=-1)
    want = halves * c + rotate_half * s
    torch.testing.assert_close(torch.cat([got[..., 0::2], got[..., 1::2]], -1), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_view_of_qkv_leaves_values_alone(cpp_isa, dtype):
    """The encoder's call: queries and keys of a (B, L, 3 * H, hd) QKV output, in place; the
    value heads (and the rest of the buffer) keep their bits."""
    b, length, nh, hd = 3, 11, 4, 16
    qkv = _x((b, length, 3 * nh, hd), dtype, seed=3)
    before = qkv.clone()
    cos, sin = _tables(length, hd // 2)
    qk = qkv[:, :, : 2 * nh]
    assert not qk.is_contiguous()
    ops.rotary_embed(qk, cos, sin, backend="cpp")
    assert torch.equal(qkv[:, :, 2 * nh :], before[:, :, 2 * nh :])
    want = reference.rotary_embed(before[:, :, : 2 * nh].clone(), cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(qkv[:, :, : 2 * nh].float(), want.float(), rtol=tol, atol=tol)


def test_identity_angle_keeps_bits(cpp_isa):
    x = _x((2, 5, 3, 10), torch.bfloat16)
    got = ops.rotary_embed(x.clone(), torch.ones(5, 5), torch.zeros(5, 5), backend="cpp")
    assert torch.equal(got, x)


@pytest.mark.parametrize("shape", [(0, 4, 2, 8), (2, 0, 2, 8), (2, 4, 0, 8), (2, 4, 2, 0)])
def test_empty(shape, any_backend):
    if any_backend == "triton":
        pytest.skip("no triton rotary_embed: the GPU forward rotates with a complex product")
    x = torch.zeros(shape)
    cos, sin = torch.zeros(shape[1], shape[3] // 2), torch.zeros(shape[1], shape[3] // 2)
    assert ops.rotary_embed(x, cos, sin, backend=any_backend).shape == shape


@pytest.mark.parametrize(
    ("x", "cos", "sin", "match"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 2), torch.zeros(2, 2), "x: expected a 4-D"),
        (torch.zeros(1, 2, 3, 5), torch.zeros(2, 2), torch.zeros(2, 2), "x: expected a 4-D .* even dim"),
        (torch.zeros(1, 2, 3, 4).half(), torch.zeros(2, 2), torch.zeros(2, 2), "x: expected float32"),
        (torch.zeros(1, 2, 4, 3).mT[..., :2], torch.zeros(2, 1), torch.zeros(2, 1), "x: .*contiguous"),
        (torch.zeros(1, 2, 3, 4), torch.zeros(3, 2), torch.zeros(2, 2), r"cos: .* shape \(2, 2\)"),
        (torch.zeros(1, 2, 3, 4), torch.zeros(2, 2), torch.zeros(2, 2).double(), "sin: expected float32"),
        (torch.zeros(1, 2, 3, 4), torch.zeros(2, 2), "sin", "sin: expected float32"),
    ],
)
def test_bad_arguments(x, cos, sin, match):
    with pytest.raises(ValueError, match=match):
        ops.rotary_embed(x, cos, sin)
