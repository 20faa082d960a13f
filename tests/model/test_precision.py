"""Encoder precisions: int8 and bf16 against float32 (fidelity), the "auto" rule, switching in place,
both forwards (edgeplaid's ModernBERT and transformers'), and bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.model._texts import DOCUMENTS, QUERIES

from edgeplaid._native import C
from edgeplaid.model import ColBERT, _modernbert, _precision
from edgeplaid.model import colbert as colbert_module
from edgeplaid.model._precision import QuantizedLinear, resolve_precision
from edgeplaid.ops.attention import cpp_ready

needs_cpp = pytest.mark.skipif(C is None, reason="edgeplaid._C is not built (int8 is its kernel)")


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        pytest.param("int8", "float32", marks=needs_cpp),
        pytest.param("int8", "bfloat16", marks=needs_cpp),  # int8 layers in a bf16 model
        ("bf16", None),
    ],
)
@pytest.mark.parametrize("size", ["17m", "32m", "bert"])
def test_low_precision_tokens_close_to_fp32(
    model_dirs: dict[str, Path], size: str, precision: str, dtype: str | None
) -> None:
    """Per-token cosine to the float32 vectors (the bar of bench_encode.py, on these texts); bf16 is
    emulated by torch on CPUs without AVX512-BF16."""
    fp32 = ColBERT.from_pretrained(model_dirs[size], precision="fp32")
    low = ColBERT.from_pretrained(model_dirs[size], precision=precision, dtype=dtype)
    assert low.precision == precision and fp32.precision == "fp32"
    assert low.dtype == (torch.float32 if dtype == "float32" else torch.bfloat16)
    t32, l32 = fp32.encode_documents(DOCUMENTS)
    t_low, l_low = low.encode_documents(DOCUMENTS)
    assert torch.equal(l32, l_low) and t_low.dtype == torch.float32
    cos = _cosines(t_low, t32)
    assert float(cos.mean()) >= 0.999 and float(cos.min()) >= 0.99, (float(cos.mean()), float(cos.min()))
    q32, m32 = fp32.encode_queries(QUERIES)
    q_low, m_low = low.encode_queries(QUERIES)
    assert torch.equal(m32, m_low) and q_low.dtype == torch.float32
    assert float(_cosines(q_low[m_low], q32[m32]).mean()) >= 0.999


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("vnni", [True, False])
@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_rule_on_cpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool, vnni: bool, amx: bool) -> None:
    """With native bf16: bf16 on AMX CPUs, int8 (on a bf16 model) where the int8 kernels run VNNI,
    else bf16; without: int8 for the own ModernBERT forward (when the C++ kernel is built) and for
    other backbones where the int8 kernels run VNNI, else fp32; an explicit dtype wins."""
    if amx and not native_bf16:
        pytest.skip("every AMX CPU has AVX512-BF16")
    monkeypatch.setattr(_precision, "cpu_has_bf16", lambda: native_bf16)
    monkeypatch.setattr(_precision, "vnni_int8", lambda: vnni and C is not None)
    monkeypatch.setattr(_precision, "amx_present", lambda: amx)
    cpu = torch.device("cpu")
    if native_bf16:
        own = other = "int8" if vnni and C is not None and not amx else "bf16"
    else:
        own = "int8" if C is not None else "fp32"
        other = "int8" if vnni and C is not None else "fp32"
    assert resolve_precision("auto", cpu, None, own_forward=True) == own
    assert resolve_precision("auto", cpu, None, own_forward=False) == other
    assert resolve_precision("auto", cpu, torch.float32) == "fp32"


@needs_cpp
def test_auto_follows_the_cpu_and_int8_switches_in_place(model_dirs: dict[str, Path]) -> None:
    auto = ColBERT.from_pretrained(model_dirs["17m"])
    assert auto.precision == resolve_precision("auto", torch.device("cpu"), None)
    assert auto.precision == "int8" or (auto.precision == "bf16" and _precision.cpu_has_bf16())
    # int8 takes the weights' dtype for everything but its linear layers: float32 weights switch
    # to and from "fp32" in place, bf16 ones to and from "bf16".
    for dtype, other in (("float32", "fp32"), ("bfloat16", "bf16")):
        int8 = ColBERT.from_pretrained(model_dirs["17m"], precision="int8", dtype=dtype)
        plain = ColBERT.from_pretrained(model_dirs["17m"], precision=other)
        t8 = int8.encode_documents(DOCUMENTS[:3])[0]
        int8.precision = other  # in place: exactly the plain model
        want = plain.encode_documents(DOCUMENTS[:3])[0]
        torch.testing.assert_close(int8.encode_documents(DOCUMENTS[:3])[0], want)
        int8.precision = "int8"
        torch.testing.assert_close(int8.encode_documents(DOCUMENTS[:3])[0], t8, rtol=0, atol=0)
    assert ColBERT.from_pretrained(model_dirs["17m"], precision="int8").dtype == _precision.int8_dtype()
    assert ColBERT.from_pretrained(model_dirs["17m"], dtype="float32").precision == "fp32"


@needs_cpp
def test_both_forwards_quantise_the_same_layers(model_dirs: dict[str, Path]) -> None:
    """transformers' ModernBERT forward (QuantizedLinear modules) and edgeplaid's (PackedLinears)
    quantise the same layers: their int8 vectors agree better than either does with fp32 (they
    differ by float32 rounding before the activations are rounded to int8)."""
    ours = ColBERT.from_pretrained(model_dirs["17m"], precision="int8")
    theirs = ColBERT.from_pretrained(model_dirs["17m"], precision="int8")
    theirs.use_fast_forward = False
    a = ours.encode_documents(DOCUMENTS)[0]
    b = theirs.encode_documents(DOCUMENTS)[0]
    exact = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32").encode_documents(DOCUMENTS)[0]
    assert float(_cosines(a, b).min()) > float(_cosines(a, exact).min())
    assert float(_cosines(a, b).mean()) >= 0.9995
    # Every linear layer runs int8 in both; the MLP's output projections rotated (blocks of 64).
    assert not [n for n, m in theirs.backbone.named_modules() if type(m) is torch.nn.Linear]
    rotated = {n for n, m in theirs.backbone.named_modules() if isinstance(m, QuantizedLinear) and m.rotate}
    assert rotated and all(n.endswith("mlp.Wo") for n in rotated), rotated
    assert {m.rotate for m in theirs.backbone.modules() if isinstance(m, QuantizedLinear)} == {0, 64}
    assert all(m.int8 for m in theirs.backbone.modules() if isinstance(m, QuantizedLinear))


@needs_cpp
def test_int8_keeps_the_state_dict_and_follows_weight_changes(model_dirs: dict[str, Path]) -> None:
    fp32 = ColBERT.from_pretrained(model_dirs["bert"], precision="fp32")
    int8 = ColBERT.from_pretrained(model_dirs["bert"], precision="int8")
    assert fp32.state_dict().keys() == int8.state_dict().keys()
    before = int8.encode_documents(DOCUMENTS[:2])[0]
    fresh = ColBERT.from_pretrained(model_dirs["bert"], precision="int8")
    with torch.no_grad():  # the same change in place in both: the quantised copies follow
        for m in (int8, fresh):
            next(m.backbone.parameters()).mul_(1.5)
            m.backbone.encoder.layer[0].attention.self.query.weight.mul_(-1.0)
    after = int8.encode_documents(DOCUMENTS[:2])[0]
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, fresh.encode_documents(DOCUMENTS[:2])[0], rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("size", ["17m", "bert"])
def test_int8_calibration_smooths_every_int8_layer(model_dirs: dict[str, Path], size: str) -> None:
    """Setting int8 calibrates on the shipped sample text: every int8 layer's weight has its input
    ranges recorded and is quantised smoothed, but the MLP's output projections, which are rotated
    instead; deterministic, and again after ``.to()``."""
    model = ColBERT.from_pretrained(model_dirs[size], precision="int8")
    ranges = model._linears.act_amax
    assert ranges and all(r.ndim == 1 and bool((r > 0).any()) for _, r in ranges.values())
    layers = [m for m in model.backbone.modules() if isinstance(m, QuantizedLinear)]
    if size == "bert":  # transformers' forward: its layers share the model's ranges
        assert layers and all(m.__dict__["ranges"] is ranges for m in layers)
        # Rotated layers (the MLP output projections) are never smoothed: no ranges of their own.
        assert all((id(m.weight) in ranges) == (m.rotate == 0) for m in layers)
    first = model.encode_documents(DOCUMENTS)[0]
    int8_weights = [e[2] for key, e in model._linears._cache.items() if "|int8|" in key[1]]
    int8_weights += [m._quantized() for m in layers if size == "bert"]
    assert int8_weights and all((w.inv_smooth is None) == (w.rotate > 0) for w in int8_weights)
    assert {w.rotate for w in int8_weights} == {0, 64}
    again = ColBERT.from_pretrained(model_dirs[size], precision="int8").encode_documents(DOCUMENTS)[0]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    model.to(model.dtype)  # nothing changes: the calibration is kept
    assert model._linears.act_amax
    torch.testing.assert_close(model.encode_documents(DOCUMENTS)[0], first, rtol=0, atol=0)


@needs_cpp
def test_int8_recalibrates_only_when_to_changes_the_parameters(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ColBERT.from_pretrained(model_dirs["17m"], precision="int8", dtype="float32")
    calls = []
    original = colbert_module.calibrate_int8
    monkeypatch.setattr(colbert_module, "calibrate_int8", lambda m: calls.append(1) or original(m))
    first = model.encode_documents(DOCUMENTS[:2])[0]
    model.to("cpu")
    model.float()
    assert calls == []  # same tensors, same data: the ranges kept, nothing re-run
    torch.testing.assert_close(model.encode_documents(DOCUMENTS[:2])[0], first, rtol=0, atol=0)
    with torch.no_grad():
        model.to(torch.float64).to(torch.float32)  # new tensors each way
    assert len(calls) == 1  # float64 is not an int8 dtype: only the way back calibrates
    torch.testing.assert_close(model.encode_documents(DOCUMENTS[:2])[0], first, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("size", ["17m", "bert"])
def test_int8_smoothing_cuts_the_error_of_outlier_channels(model_dirs: dict[str, Path], size: str) -> None:
    """Layer norms with a few channels 25x the rest (as BERT's): calibrated smoothing brings the
    int8 vectors closer to float32 than int8 without it."""

    def outliers(model: ColBERT) -> ColBERT:
        with torch.no_grad():
            for name, m in model.backbone.named_modules():
                if isinstance(m, torch.nn.LayerNorm) and "final" not in name:
                    m.weight[3] *= 25.0
                    m.weight[-7] *= -25.0
        return model

    model = outliers(ColBERT.from_pretrained(model_dirs[size], precision="fp32"))
    exact = model.encode_documents(DOCUMENTS)[0]
    model.precision = "int8"  # calibrates on the changed model
    smoothed = _cosines(model.encode_documents(DOCUMENTS)[0], exact)
    model._linears.act_amax.clear()
    model._linears.drop_copies()
    for m in model.backbone.modules():
        if isinstance(m, QuantizedLinear):
            m.__dict__["_q"] = None
    plain = _cosines(model.encode_documents(DOCUMENTS)[0], exact)
    got = (float(smoothed.mean()), float(plain.mean()))
    assert float(1 - smoothed.mean()) < 0.7 * float(1 - plain.mean()), got


@needs_cpp
@pytest.mark.skipif(not _precision.vnni_int8(), reason="the fused GEGLU runs with the VNNI kernel")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_fused_geglu_matches_the_two_products(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """The MLP input as one int8 call (post "geglu": the same int8 sums, the kernel's GELU; the op
    tests hold it to the two products to float rounding) keeps the vectors as close to float32
    as the two calls and torch's GELU: the models differ only where a float rounding flips an
    int8 rounding in a later layer, which is int8's own noise."""
    exact = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32").encode_documents(DOCUMENTS)[0]
    model = ColBERT.from_pretrained(model_dirs["17m"], precision="int8", dtype=dtype)
    probe = torch.zeros(1, 1, dtype=model.dtype)
    assert model._linears.fuses_geglu(probe, probe)
    fused = _cosines(model.encode_documents(DOCUMENTS)[0], exact)
    monkeypatch.setattr(_modernbert.PackedLinears, "fuses_geglu", lambda self, x, source: False)
    unfused = _cosines(model.encode_documents(DOCUMENTS)[0], exact)
    assert float(fused.mean()) >= 0.999 and float(fused.min()) >= 0.99
    means = (float(fused.mean()), float(unfused.mean()))
    assert abs(means[0] - means[1]) < 1e-4, means


@needs_cpp
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_fused_layer_norms_match_applying_them(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """The layer norms in front of the int8 layers, inside int8_linear's quantisation (never
    rounded to the model's dtype), keep the vectors as close to float32 as torch's layer norm
    applied first: the models differ by float rounding flipping an int8 rounding, int8's noise."""
    exact = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32").encode_documents(DOCUMENTS)[0]
    model = ColBERT.from_pretrained(model_dirs["17m"], precision="int8", dtype=dtype)
    calls = []
    original = _modernbert.int8_linear
    monkeypatch.setattr(_modernbert, "int8_linear", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    fused = _cosines(model.encode_documents(DOCUMENTS)[0], exact)
    n_norms = sum(kw.get("norm") is not None for kw in calls)
    layers = len(model.backbone.layers)
    probe = torch.zeros(1, 1, dtype=model.dtype)
    mlp_norms = layers if model._linears.fuses_geglu(probe, probe) else 0  # else two calls: applied
    assert n_norms == layers - 1 + mlp_norms  # every attn_norm but layer 0's (an Identity)
    monkeypatch.setattr(_modernbert.PackedLinears, "fuse_norms", False)
    applied = _cosines(model.encode_documents(DOCUMENTS)[0], exact)
    assert float(fused.mean()) >= 0.999 and float(fused.min()) >= 0.99
    means = (float(fused.mean()), float(applied.mean()))
    assert abs(means[0] - means[1]) < 2e-4, means


@needs_cpp
def test_int8_calibration_edges(model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The head is calibrated even where oneDNN does not take its input; ranges belong to the very
    weight tensor (a new one with a reused id gets none); a failed calibration leaves the model as
    it was."""
    monkeypatch.setattr(_modernbert.PackedLinears, "uses_onednn", lambda self, x: False)
    model = ColBERT.from_pretrained(model_dirs["17m"], precision="int8", dtype="float32")
    head = model.head[-1].linear.weight
    assert _precision.input_ranges(model._linears.act_amax, head) is not None
    ranges = {id(head): (head.detach().clone(), torch.ones(head.shape[1]))}
    assert _precision.input_ranges(ranges, head) is None

    def broken(model: ColBERT) -> None:
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(colbert_module, "calibrate_int8", broken)
    plain = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32")
    with pytest.raises(RuntimeError, match="calibration failed"):
        plain.precision = "int8"
    assert plain.precision == "fp32" and not plain._linears.int8
    assert not any(m.int8 for m in plain.backbone.modules() if isinstance(m, QuantizedLinear))


def test_bad_precisions(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="precision: expected one of"):
        ColBERT.from_pretrained(model_dirs["bert"], precision="int4")
    with pytest.raises(ValueError, match="contradicts precision"):
        ColBERT.from_pretrained(model_dirs["bert"], precision="fp32", dtype="bfloat16")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_precision("int8", torch.device("cuda"), None)
    model = ColBERT.from_pretrained(model_dirs["bert"], precision="fp32")
    with pytest.raises(ValueError, match=r"needs torch\.bfloat16 weights"):
        model.precision = "bf16"
    with pytest.raises(ValueError, match="precision: expected one of"):
        model.precision = "auto"
    assert resolve_precision("auto", torch.device("cpu"), torch.bfloat16) == "bf16"
    assert ColBERT.from_pretrained(model_dirs["bert"], precision="bf16").dtype == torch.bfloat16


@pytest.mark.skipif(
    not cpp_ready(torch.bfloat16, 64), reason="no bf16 attention kernel here (AMX-BF16 or AVX512-BF16)"
)
def test_bf16_attention_kernel_matches_sdpa(model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    """bf16 on CPUs with AMX or AVX512-BF16 runs attention in the bf16 kernel (full and sliding
    layers, padded batches): the same vectors as torch's SDPA (bf16 on AMX CPUs, float32 on the
    others), to bf16 rounding."""
    model = ColBERT.from_pretrained(model_dirs["17m"], precision="bf16")
    texts = [*DOCUMENTS, "a short one", " ".join(DOCUMENTS)]  # padding, and past the 128-token window
    kernel, lengths = model.encode_documents(texts)
    monkeypatch.setattr(_modernbert, "cpp_ready", lambda dtype, head_dim: False)  # torch's SDPA
    sdpa, lengths_sdpa = model.encode_documents(texts)
    assert torch.equal(lengths, lengths_sdpa)
    cos = _cosines(kernel, sdpa)
    assert float(cos.mean()) >= 0.9999 and float(cos.min()) >= 0.999, (float(cos.mean()), float(cos.min()))
