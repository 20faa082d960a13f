"""Compiles every Triton kernel of edgeplaid for sm_90 (H100) on a machine without a GPU.

The interpreter runs kernels with numpy semantics and lets through what the compiler rejects
(non-constexpr globals, type mismatches in loops, unsupported dot shapes); this runs the real
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas). It also checks the
MaxSim inner loop's shape: tensor-core dots (mma), 16-byte vector loads of the document
tiles, and cp.async pipelining. Run by tests/ops/test_triton_compile.py in a subprocess
(TRITON_INTERPRET must be unset before triton is imported); prints one line per kernel.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)

import triton
from edgeplaid.triton_kernels import centroid_interaction as ci
from edgeplaid.triton_kernels import centroid_scores as cs
from edgeplaid.triton_kernels import decompress_residuals as dr
from edgeplaid.triton_kernels import fused_decompress_maxsim as fd
from edgeplaid.triton_kernels import maxsim as ms
from edgeplaid.triton_kernels import maxsim_packed as mp
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def build(kernel: Any, types: dict[str, str], consts: dict[str, Any], num_warps: int = 4) -> Any:
    """Compile like a launch would: pointers 16-byte aligned, dim and lq multiples of 16."""
    fn = getattr(kernel, "fn", kernel)  # unwrap the autotuner
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n not in consts and (sig[n].startswith("*") or n in ("dim", "lq"))
    }
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs
    )
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": 3})
    print(f"ok {fn.__name__} {consts} shared={compiled.metadata.shared}")
    return compiled


def main() -> int:
    packed = dict(
        q_ptr="*fp16", qm_ptr="*u8", tok_ptr="*fp16", off_ptr="*i64", cand_ptr="*i64", out_ptr="*fp32",
        nq="i32", n_out="i32", n_docs="i32", q_per_prog="i32", piece_stride="i32", lq="i32", dim="i32",
    )  # fmt: skip
    base = dict(HAS_QMASK=True, UPCAST=False, BLOCK_Q=32, BLOCK_K=64, BLOCK_T=64)
    k = build(mp._maxsim_packed_kernel, packed, dict(base, HAS_CAND=False, PIECES=1, F32_DOT=False))
    ptx = k.asm["ptx"]
    assert re.search(r"mma\.sync", ptx), "maxsim_packed: no tensor-core mma"
    assert re.search(r"ld\.global\S*\.v4\.b32", ptx), (
        "maxsim_packed: document tiles not loaded 16 bytes at a time"
    )
    assert re.search(r"cp\.async", ptx), "maxsim_packed: loads not pipelined"
    build(
        mp._maxsim_packed_kernel,
        dict(packed, q_ptr="*bf16", tok_ptr="*bf16"),
        dict(base, HAS_CAND=True, PIECES=3, F32_DOT=False),
    )
    build(
        mp._maxsim_packed_kernel,
        dict(packed, q_ptr="*fp32", tok_ptr="*fp32"),
        dict(base, HAS_CAND=True, PIECES=1, F32_DOT=True),
    )

    padded = dict(
        q_ptr="*fp16", qm_ptr="*u8", d_ptr="*fp16", dm_ptr="*u8", out_ptr="*fp32", nq="i32", nd="i32",
        q_per_prog="i32", piece_stride="i32", lq="i32", ld="i32", dim="i32",
    )  # fmt: skip
    build(
        ms._maxsim_kernel,
        padded,
        dict(base, HAS_DMASK=True, PIECES=2, F32_DOT=False, BLOCK_K=128, BLOCK_T=128),
        8,
    )

    scores = dict(
        q_ptr="*bf16", qm_ptr="*u8", c_ptr="*bf16", s_ptr="*fp32", key_ptr="*i64", n_rows="i32", n_cent="i32",
        piece_stride="i32", key_stride="i32", dim="i32",
    )  # fmt: skip
    sc = dict(HAS_QMASK=True, UPCAST=False, BLOCK_M=32, BLOCK_K=64, BLOCK_C=256)
    build(cs._centroid_scores_kernel, scores, dict(sc, PIECES=3, F32_DOT=False, KOUT=32), 8)  # tl.topk
    build(
        cs._centroid_scores_kernel,
        dict(scores, q_ptr="*fp32", c_ptr="*fp32"),
        dict(sc, PIECES=1, F32_DOT=True, KOUT=256),
    )

    codec = dict(
        codes_ptr="*i32",
        res_ptr="*u8",
        cent_ptr="*fp16",
        w_ptr="*fp32",
        out_ptr="*fp16",
        n="i32",
        n_cent="i32",
        dim="i32",
    )
    for nbits in (1, 2, 4, 8):
        build(dr._decompress_residuals_kernel, codec, dict(NBITS=nbits, BLOCK_K=64, BLOCK_T=64))

    fused = dict(
        q_ptr="*fp16", qm_ptr="*u8", codes_ptr="*i64", res_ptr="*u8", off_ptr="*i64", cand_ptr="*i64",
        cent_ptr="*fp16", w_ptr="*fp32", out_ptr="*fp32", nq="i32", n_out="i32", n_docs="i32",
        q_per_prog="i32", n_cent="i32", lq="i32", dim="i32",
    )  # fmt: skip
    for qdt, pieces in (("fp16", 2), ("bf16", 3), ("fp32", 1)):
        build(
            fd._fused_decompress_maxsim_kernel,
            dict(fused, q_ptr=f"*{qdt}"),
            dict(base, NBITS=4, HAS_CAND=qdt == "fp16", F32_DOT=qdt == "fp32", D_PIECES=pieces),
        )

    inter = dict(
        cs_ptr="*fp32", keep_ptr="*u8", qm_ptr="*u8", codes_ptr="*i32", off_ptr="*i64", cand_ptr="*i64",
        out_ptr="*fp32", nq="i32", n_out="i32", n_docs="i32", q_per_prog="i32", n_cent="i32", lq="i32",
    )  # fmt: skip
    for thr in (False, True):
        build(
            ci._centroid_interaction_kernel,
            inter,
            dict(HAS_CAND=thr, HAS_QMASK=True, HAS_THRESHOLD=thr, BLOCK_Q=32, BLOCK_T=64),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
