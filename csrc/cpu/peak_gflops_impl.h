// The fp32 FMA peak probe: 10 independent accumulator chains per thread (enough to cover
// the FMA latency x throughput of current x86 cores without spilling: 16 would spill and
// halve the rate on AVX2). Returns the FLOPs executed.
// edgeplaid-isa: avx512vnni avx512bf16 (int8_probe with vpdpbusd; bf16_probe with vdpbf16ps)
#pragma once
#include "code_scoring.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

#if !defined(EDGEPLAID_ISA_VNNI) && !defined(EDGEPLAID_ISA_BF16)  // those units add one probe each
double fma_probe(int64_t iterations) {
  constexpr int kChains = 10;
  Vec acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = Vec::set1(1.0f + 0.01f * float(c));
  // x -> x * a + b has the fixed point 1: values stay normal forever. Without -ffast-math the
  // compiler may not reassociate the chains, so the loop runs as written.
  const Vec a = Vec::set1(0.999999f), b = Vec::set1(0.000001f);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 10
    for (int c = 0; c < kChains; ++c) acc[c] = fmadd(acc[c], a, b);
  }
  Vec total = Vec::zero();
  for (int c = 0; c < kChains; ++c) total = total + acc[c];
  volatile float sink = total.sum();
  (void)sink;
  return 2.0 * double(Vec::W) * kChains * double(iterations);
}
#endif

#if defined(EDGEPLAID_ISA_BF16)
// The bf16 multiply-add peak of vdpbf16ps (the bf16 attention kernel's instruction): 10
// independent chains of zmm vdpbf16ps, each 32 bf16 multiply-adds into 16 float32 lanes. Returns
// the FLOPs executed (2 per multiply-add).
double bf16_probe(int64_t iterations) {
  constexpr int kChains = 10;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(float(c));
  // 2^-10 x 2^-10 pairs: each chain grows by 2^-19 a round, far from overflow for any run.
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3A80), b = (__m512bh)_mm512_set1_epi16(0x3A80);
  for (int64_t i = 0; i < iterations; ++i) {
    asm volatile("" : "+v"(a), "+v"(b));  // keeps the products in the loop
#pragma GCC unroll 10
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  __m512 total = _mm512_setzero_ps();
  for (int c = 0; c < kChains; ++c) total = _mm512_add_ps(total, acc[c]);
  volatile float sink = _mm512_reduce_add_ps(total);
  (void)sink;
  return 2.0 * 32.0 * kChains * double(iterations);
}
#else
// The int8 multiply-add peak: 10 independent chains of the two-group dot product (dot8) the int8
// code-scoring kernel issues: two vpdpbusd with VNNI; two vpmaddubsw + vpmaddwd + vpaddd with
// AVX-512BW; on AVX2 two vpsignb + vpmaddubsw, one vpaddw, vpmaddwd and vpaddd, with the vpabsb of
// the document bytes once per round (the kernel: once per NQV query vectors). Returns the integer
// operations executed (2 per multiply-add, as FLOPs are counted).
double int8_probe(int64_t iterations) {
  constexpr int kChains = 10;
  IVec acc[kChains], s0[kChains], s1[kChains];
  alignas(64) int8_t bytes[64 + 2 * kChains];
  for (int i = 0; i < 64 + 2 * kChains; ++i) bytes[i] = int8_t(i % 7 - 3);
  // Different signed operands per chain: identical ones would let the compiler share the
  // products between the chains.
  for (int c = 0; c < kChains; ++c) {
    s0[c] = IVec::load(bytes + c);
    s1[c] = IVec::load(bytes + kChains + c);
  }
  IVec u0 = IVec::load(bytes), u1 = IVec::load(bytes + 1);
  for (int c = 0; c < kChains; ++c) acc[c] = IVec::load(bytes);
  for (int64_t i = 0; i < iterations; ++i) {
    // An empty asm that "changes" the document bytes: without it the compiler hoists the
    // loop-invariant products out of the loop and times only the adds.
#if defined(EDGEPLAID_ISA_AVX512)
    asm volatile("" : "+v"(u0.v), "+v"(u1.v));
#elif defined(EDGEPLAID_ISA_AVX2)
    asm volatile("" : "+x"(u0.v), "+x"(u1.v));
#else
    asm volatile("" : "+r"(u0.v), "+r"(u1.v));
#endif
    const DocBytes d0 = doc_bytes_of(u0), d1 = doc_bytes_of(u1);
#pragma GCC unroll 10
    for (int c = 0; c < kChains; ++c) acc[c] = dot8(acc[c], d0, s0[c], d1, s1[c]);
  }
  int32_t total = 0;
  for (int c = 0; c < kChains; ++c) {
    alignas(64) int32_t lanes[16];
    std::memcpy(lanes, &acc[c].v, sizeof(acc[c].v));
    total += lanes[0];
  }
  volatile int32_t sink = total;
  (void)sink;
  return 2.0 * 8.0 * double(Vec::W) * kChains * double(iterations);
}
#endif

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
