// rotary_embed: rotary position embedding of interleaved pairs, in place.
//
//   for x[b, l, g, 2i : 2i + 2] = (u, v) and the angle of position l and pair i:
//   (u, v) <- (u * cos[l, i] - v * sin[l, i],  u * sin[l, i] + v * cos[l, i])
//
// x is (B, L, G, D) float32 or bfloat16 with any strides but a contiguous last axis (the query
// and key heads of a fused QKV projection's output, say); cos and sin are (L, D / 2) float32.
// bf16 values are widened to float32, rotated and rounded back to nearest even: one rounding per
// value, as a float32 rotation followed by .to(torch.bfloat16).
//
// Why a kernel: torch has no bf16 complex product, so the encoder's bf16 forward rotated a float32
// copy (widen, complex product, narrow: three passes over the queries and keys, 15% of the 17m
// model's bf16 forward on 2 Xeon cores). Here each value is read and written once, widened, rotated
// and rounded in registers.
//
// How: one (b, l) row at a time (rows split over the threads); the row's cos / sin are expanded
// once to per-element tables c = (c0, c0, c1, c1, ...), s = (-s0, s0, -s1, s1, ...), shared by
// its G groups; then x = x * c + swap_pairs(x) * s, W lanes at a time (swap_pairs: one in-lane
// permute).
#pragma once
#include "ops.h"
#include "parallel.h"
#include "simd.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

namespace {

// (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)
EP_INLINE Vec swap_pairs(Vec x) {
#if defined(EDGEPLAID_ISA_AVX512)
  return {_mm512_permute_ps(x.v, 0xB1)};
#elif defined(EDGEPLAID_ISA_AVX2)
  return {_mm256_permute_ps(x.v, 0xB1)};
#else
  return x;  // W = 1: the scalar path rotates pairs directly
#endif
}

// x[0 : d] <- rotation of x[0 : d] by the expanded tables c, s (see above), storage type T: each
// W lanes are widened, rotated and narrowed in registers (one read and one write of x).
template <DType T>
EP_INLINE void rotate_row(typename Elem<T>::type* x, const float* c, const float* s, int64_t d) {
  int64_t i = 0;
  if constexpr (Vec::W > 1) {
    for (; i + Vec::W <= d; i += Vec::W) {
      const Vec v = load_as_f32<T>(x + i);
      const Vec y = fmadd(swap_pairs(v), Vec::load(s + i), v * Vec::load(c + i));
      if constexpr (T == DType::f32) {
        y.store(x + i);
      } else {  // through a stack slot the store forwards from: narrow_row rounds W lanes at once
        alignas(64) float lanes[Vec::W];
        y.store(lanes);
        narrow_row<T>(lanes, Vec::W, x + i);
      }
    }
  }
  for (; i < d; i += 2) {  // W = 1, or the tail (d is even, W is even)
    const float u = Elem<T>::to_float(x[i]), w = Elem<T>::to_float(x[i + 1]);
    x[i] = Elem<T>::from_float(__builtin_fmaf(w, s[i], u * c[i]));
    x[i + 1] = Elem<T>::from_float(__builtin_fmaf(u, s[i + 1], w * c[i + 1]));
  }
}

}  // namespace

void rotary_embed(void* x, DType dtype, int64_t b, int64_t l, int64_t g, int64_t d, int64_t sb, int64_t sl,
                  int64_t sg, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  parallel_for(b * l, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g * d)), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(size_t(2 * d));
    float* c = buf.data();
    float* s = c + d;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / l, li = r % l;
      for (int64_t i = 0; i < half; ++i) {
        const float ci = cos[li * half + i], si = sin[li * half + i];
        c[2 * i] = ci;
        c[2 * i + 1] = ci;
        s[2 * i] = -si;
        s[2 * i + 1] = si;
      }
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t at = bi * sb + li * sl + gi * sg;
        if (dtype == DType::f32)
          rotate_row<DType::f32>(static_cast<float*>(x) + at, c, s, d);
        else
          rotate_row<DType::bf16>(static_cast<uint16_t*>(x) + at, c, s, d);
      }
    }
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
