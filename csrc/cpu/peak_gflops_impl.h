// The fp32 FMA peak probe: 10 independent accumulator chains per thread (enough to cover
// the FMA latency x throughput of current x86 cores without spilling: 16 would spill and
// halve the rate on AVX2). Returns the FLOPs executed.
#pragma once
#include "maxsim_core.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

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

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
