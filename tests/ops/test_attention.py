"""attention: the bf16 kernels (AMX tiles; vdpbf16ps) and the float32 vector kernel (scalar, AVX2,
AVX-512) against their reference twin (full and sliding-window layers, key masks, odd lengths,
tails of every blocking, strided views of a fused QKV output), the twin against torch's SDPA, and
bad arguments. Each bf16 kernel's tests skip on CPUs without its instructions (AMX-BF16;
AVX512-BF16); the float32 ones need only edgeplaid._C."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgeplaid import ops
from edgeplaid._native import C
from edgeplaid.ops import reference
from edgeplaid.ops.attention import amx_ready, bf16_kernel, cpp_ready

needs_cpp = pytest.mark.skipif(C is None, reason="edgeplaid._C is not built")

CASES = [  # (B, L, H, D, window, masked): a lone token, tails of 16 queries and 32 keys, windows
    (1, 1, 1, 64, None, False),
    (2, 5, 1, 64, None, True),
    (3, 37, 2, 64, None, True),
    (2, 33, 3, 32, 4, False),
    (2, 70, 4, 64, 64, True),
    (1, 300, 2, 64, 64, True),
    (1, 129, 2, 32, 0, False),
]


def _qkv(b: int, length: int, h: int, d: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, length, 3, h, d, generator=g).to(dtype)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _key_mask(b: int, length: int, seed: int = 1) -> torch.Tensor:
    """Right padding of random lengths (the encoder's batches) and, in the last row, holes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    mask[-1] = torch.rand(length, generator=g) < 0.7
    mask[-1, 0] = True
    return mask


@pytest.fixture(params=["amx", "avx512bf16"])
def bf16_on(request):
    """Each bf16 kernel this CPU runs: AMX tiles, or vdpbf16ps (with the tiles turned off where
    the CPU has them: the kernel a Zen 4 runs)."""
    if C is None:
        pytest.skip("edgeplaid._C is not built")
    if request.param == "amx" and not amx_ready():
        pytest.skip("no AMX-BF16 here")
    previous = C.cpu_amx()
    if request.param == "avx512bf16" and previous:
        C.set_cpu_amx(False)
    try:
        if bf16_kernel(64) != request.param:
            pytest.skip(f"no {request.param} bf16 kernel here (bf16 heads: {bf16_kernel(64)})")
        yield request.param
    finally:
        C.set_cpu_amx(previous)


BF16_CASES = [  # beyond CASES: head dims 16 / 48 / 128 (vdpbf16ps only), odd lengths with bands
    *CASES,
    (1, 3, 2, 16, None, True),
    (2, 61, 3, 48, 7, True),
    (1, 50, 1, 128, 100, False),
    (1, 1001, 2, 64, 63, False),
    (2, 97, 2, 64, 1, True),
]


@pytest.mark.parametrize("case", BF16_CASES)
def test_matches_reference(case, bf16_on):
    b, length, h, d, window, masked = case
    if bf16_on == "amx" and d not in (32, 64):
        pytest.skip("the AMX kernel's tiles take head dims 32 and 64")
    q, k, v = _qkv(b, length, h, d)
    mask = _key_mask(b, length) if masked else None
    got = ops.attention(q, k, v, mask, window, backend="cpp")
    want = ops.attention(q, k, v, mask, window, backend="reference")
    # Same bf16 products, fp32 sums in another order: outputs differ by a bf16 rounding or two.
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert float((got.float() - want.float()).abs().mean()) < 2e-3


@pytest.mark.parametrize("window", [None, 3])
def test_reference_matches_sdpa(window):
    """The twin is attention as transformers' ModernBERT computes it (bf16 in, masked softmax)."""
    b, length, h, d = 2, 20, 2, 32
    q, k, v = _qkv(b, length, h, d, seed=2)
    mask = _key_mask(b, length)
    allowed = mask[:, None, None, :]
    if window is not None:
        pos = torch.arange(length)
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= window)
    want = F.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v)), attn_mask=allowed, scale=d**-0.5
    ).transpose(1, 2)
    got = reference.attention(q, k, v, mask, window, d**-0.5, torch.empty_like(q))
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_bf16_matches_sdpa_at_length(bf16_on):
    """A 1,000-token full layer and its sliding twin against float32 SDPA on the same bf16 inputs:
    many query and key blocks, peaked rows (the running maximum rescales what came before); the
    only loss is p's and the output's rounding to bf16."""
    q, k, v = _qkv(1, 1000, 2, 64, seed=3)
    q = (q.float() * 4).bfloat16()
    pos = torch.arange(1000)
    for window in (None, 64):
        allowed = None if window is None else (pos[:, None] - pos[None, :]).abs() <= window
        want = F.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v)), attn_mask=allowed, scale=0.125
        ).transpose(1, 2)
        got = ops.attention(q, k, v, None, window, backend="cpp").float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert float((got - want).abs().mean()) < 1e-3


def test_writes_out_in_place_and_leaves_inputs(bf16_on):
    q, k, v = _qkv(2, 40, 2, 64)
    before = [t.clone() for t in (q, k, v)]
    out = torch.full((2, 40, 2, 64), 7.0, dtype=torch.bfloat16)
    assert ops.attention(q, k, v, None, 8, out=out, backend="cpp") is out
    assert all(torch.equal(t, t0) for t, t0 in zip((q, k, v), before, strict=True))
    want = reference.attention(q, k, v, None, 8, 0.125, out.clone())
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_row_without_keys_is_zero(bf16_on):
    q, k, v = _qkv(1, 51, 1, 32)
    mask = torch.zeros(1, 51, dtype=torch.bool)
    mask[0, :3] = True  # queries past position 3 + window see no key
    got = ops.attention(q, k, v, mask, 2, backend="cpp")
    assert torch.isfinite(got.float()).all() and not got[0, 10:].any()
    assert got[0, :3].any()
    got = ops.attention(q, k, v, torch.zeros(1, 51, dtype=torch.bool), None, backend="cpp")
    assert not got.any()  # no key at all


def test_empty_reference():
    q = torch.zeros(0, 4, 2, 64, dtype=torch.bfloat16)
    assert ops.attention(q, q, q, backend="reference").shape == q.shape


def test_empty(bf16_on):
    q = torch.zeros(0, 4, 2, 64, dtype=torch.bfloat16)
    assert ops.attention(q, q, q, backend="cpp").shape == q.shape


@needs_cpp
def test_bf16_follows_a_forced_isa():
    """vdpbf16ps is AVX-512 code: with a narrower ISA forced (an AVX2-only CPU emulated) bf16 heads
    have no vector kernel, cpu_info says so, and the op refuses them naming what it needs (AMX
    tiles, where enabled, do not depend on the ISA)."""
    previous = C.cpu_isa_state()
    C.set_cpu_isa("avx2" if "avx2" in C.cpu_info()["supported_isas"] else "scalar")
    try:
        kernel = bf16_kernel(64)
        assert kernel == ("amx" if amx_ready() else "none")
        assert C.cpu_info()["op_isa"]["attention[bf16]"] == kernel
        assert not cpp_ready(torch.bfloat16, 48)  # AMX takes 32 / 64 only
        q, k, v = _qkv(1, 4, 1, 48)
        with pytest.raises(ValueError, match="attention: bfloat16 needs AMX-BF16 tiles"):
            ops.attention(q, k, v, backend="cpp")
    finally:
        C.set_cpu_isa(previous)


@needs_cpp
@pytest.mark.parametrize("d", [8, 40, 528])
def test_bf16_refuses_other_head_dims(d):
    assert not cpp_ready(torch.bfloat16, d)
    q, k, v = _qkv(1, 4, 1, d)
    with pytest.raises(ValueError, match=f"attention: bfloat16 needs .* got head dim {d}"):
        ops.attention(q, k, v, backend="cpp")


def _bf16(*shape):
    return torch.zeros(shape, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((_bf16(2, 3, 4), _bf16(2, 3, 4), _bf16(2, 3, 4)), {}, "q: expected a 4-D"),
        (
            (torch.zeros(1, 2, 1, 32), _bf16(1, 2, 1, 32), _bf16(1, 2, 1, 32)),
            {},
            "k: expected bfloat16 or float32",
        ),
        ((torch.zeros(1, 2, 1, 32, dtype=torch.float64),) * 3, {}, "q: expected bfloat16 or float32"),
        ((_bf16(1, 2, 1, 32), _bf16(1, 3, 1, 32), _bf16(1, 2, 1, 32)), {}, "k: expected the shape of q"),
        ((_bf16(1, 2, 1, 32),) * 2 + (_bf16(1, 2, 1, 64)[..., ::2],), {}, "v: expected a contiguous"),
        ((_bf16(1, 2, 1, 32),) * 3, {"key_mask": torch.ones(1, 3).bool()}, "key_mask: expected bool"),
        ((_bf16(1, 2, 1, 32),) * 3, {"key_mask": torch.ones(1, 2)}, "key_mask: expected bool"),
        ((_bf16(1, 2, 1, 32),) * 3, {"window": -1}, "window: expected a non-negative int"),
        ((_bf16(1, 2, 1, 32),) * 3, {"window": 2.0}, "window: expected a non-negative int"),
        ((_bf16(1, 2, 1, 32),) * 3, {"out": torch.zeros(1, 2, 1, 32)}, "out: expected torch.bfloat16"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.attention(*args, **kwargs)


# ---- float32 heads: the vector kernel (attention_vec.h) on every ISA this CPU runs

FP32_CASES = [  # beyond CASES: head dims 16 / 48 / 128, a window wider than the sequence, many blocks
    *CASES,
    (1, 3, 2, 16, None, True),
    (2, 61, 3, 48, 7, True),
    (1, 50, 1, 128, 100, False),
    (1, 200, 1, 64, None, True),
]


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    """Each kernel set this CPU runs (forced: the float32 attention follows a forced ISA)."""
    if C is None:
        pytest.skip("edgeplaid._C is not built")
    if request.param not in C.cpu_info()["supported_isas"]:
        pytest.skip(f"no {request.param} here")
    previous = C.cpu_isa_state()
    C.set_cpu_isa(request.param)
    assert C.cpu_info()["op_isa"]["attention"] == request.param
    yield request.param
    C.set_cpu_isa(previous)


@pytest.mark.parametrize("case", FP32_CASES)
def test_fp32_matches_reference(case, isa):
    b, length, h, d, window, masked = case
    q, k, v = _qkv(b, length, h, d, dtype=torch.float32)
    mask = _key_mask(b, length) if masked else None
    got = ops.attention(q, k, v, mask, window, backend="cpp")
    want = ops.attention(q, k, v, mask, window, backend="reference")
    assert got.dtype == torch.float32
    # float32 throughout (the exponential to 2e-7): sums in another order, nothing rounded to bf16
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@needs_cpp
def test_fp32_is_the_default_on_cpu():
    """float32 heads take the C++ kernel without asking (bf16 ones where a bf16 kernel runs), and the
    reference where the head dim is not a multiple of 16."""
    assert cpp_ready(torch.float32, 64) and cpp_ready(torch.float32, 16)
    assert not cpp_ready(torch.float32, 40) and not cpp_ready(torch.float64, 64)
    q, k, v = _qkv(2, 30, 2, 64, dtype=torch.float32)
    got = ops.attention(q, k, v, None, 4)
    torch.testing.assert_close(got, ops.attention(q, k, v, None, 4, backend="cpp"), rtol=0, atol=0)
    q, k, v = _qkv(1, 9, 1, 40, dtype=torch.float32)  # reference, no error
    torch.testing.assert_close(ops.attention(q, k, v), ops.attention(q, k, v, backend="reference"))


def test_fp32_row_without_keys_is_zero(isa):
    q, k, v = _qkv(1, 120, 2, 32, dtype=torch.float32)
    mask = torch.zeros(1, 120, dtype=torch.bool)
    mask[0, :3] = True  # queries past position 3 + window see no key
    got = ops.attention(q, k, v, mask, 2, backend="cpp")
    assert torch.isfinite(got).all() and not got[0, 10:].any()
    assert got[0, :3].any()
    got = ops.attention(q, k, v, torch.zeros(1, 120, dtype=torch.bool), None, backend="cpp")
    assert not got.any()  # no key at all


@needs_cpp
def test_fp32_writes_out_in_place_and_leaves_inputs():
    q, k, v = _qkv(2, 77, 2, 64, dtype=torch.float32)
    before = [t.clone() for t in (q, k, v)]
    out = torch.full((2, 77, 2, 64), 7.0)
    assert ops.attention(q, k, v, None, 8, out=out, backend="cpp") is out
    assert all(torch.equal(t, t0) for t, t0 in zip((q, k, v), before, strict=True))
    torch.testing.assert_close(
        out, reference.attention(q, k, v, None, 8, 0.125, out.clone()), rtol=2e-5, atol=2e-5
    )


@needs_cpp
def test_fp32_matches_sdpa_at_length():
    """A 1,000-token full layer and its sliding-window twin against torch's SDPA (the encoder's
    previous path): many query and key blocks, scores large enough to need the running maximum."""
    q, k, v = _qkv(1, 1000, 2, 64, seed=3, dtype=torch.float32)
    q = q * 4  # peaked softmax rows: the running maximum must rescale what came before
    pos = torch.arange(1000)
    for window in (None, 64):
        allowed = None if window is None else (pos[:, None] - pos[None, :]).abs() <= window
        want = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=allowed, scale=0.125
        ).transpose(1, 2)
        torch.testing.assert_close(
            ops.attention(q, k, v, None, window, backend="cpp"), want, rtol=1e-4, atol=1e-5
        )


@needs_cpp
@pytest.mark.parametrize("d", [8, 40, 520])
def test_fp32_refuses_other_head_dims(d):
    q, k, v = _qkv(1, 4, 1, d, dtype=torch.float32)
    with pytest.raises(ValueError, match="q: expected a head dim that is a multiple of 16"):
        ops.attention(q, k, v, backend="cpp")


@needs_cpp
def test_fp32_runs_avx512_unless_forced():
    """The float32 attention takes AVX-512 wherever the CPU has it (Zen 4 too), unless an ISA is
    forced (EDGEPLAID_CPU_ISA, set_cpu_isa): then that one (cpu_info()["op_isa"] says which)."""
    import subprocess
    import sys

    code = "from edgeplaid._native import C; print(C.cpu_info()['op_isa']['attention'], C.cpu_isa())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "EDGEPLAID_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    attention_isa, active = out.stdout.split()
    assert attention_isa == ("avx512" if "avx512" in C.cpu_info()["supported_isas"] else active)
    env["EDGEPLAID_CPU_ISA"] = "scalar"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["scalar", "scalar"]


@needs_cpp
def test_peak_bf16_gflops():
    """vdpbf16ps' peak where the bf16 vector kernel runs (twice the FMA rate on Zen 4 and Xeons:
    32 multiply-adds a zmm instruction), an error naming what is missing elsewhere."""
    if bf16_kernel(16) == "avx512bf16":  # 16 dims: never AMX's, so the vector kernel's readiness
        assert C.peak_bf16_gflops(0.02) > 0
    previous = C.cpu_isa_state()
    C.set_cpu_isa("scalar")
    try:
        with pytest.raises(ValueError, match="peak_bf16_gflops: needs AVX512-BF16"):
            C.peak_bf16_gflops(0.02)
    finally:
        C.set_cpu_isa(previous)
