// bf16 heads for attention_vec.h's driver, on AVX512-BF16's vdpbf16ps (the avx512bf16 unit): the
// encoder's attention in bf16 on CPUs without AMX (Zen 4). Semantics in ops.h (AttentionArgs): the
// same as the AMX kernel's (scores and softmax in float32, p rounded to bf16 for the second
// product, output rounded to bf16).
//
// Why: bf16 encoding on a 2-core Zen 4 ran its attention widened to float32 (196 GFLOP/s, the
// float32 kernel), where vdpbf16ps multiplies bf16 pairs at twice the FMA rate (a zmm vdpbf16ps,
// 32 multiply-adds, issues once a cycle there: 230 GFLOP/s a core against 115 for fp32 FMAs).
// The products are exact (8-bit significands), so the scores equal the float32 kernel's on the
// same bf16 inputs up to the order of the sums; only p's rounding to bf16 differs from it.
//
// How: vdpbf16ps adds a.lo * b.lo + a.hi * b.hi into each float32 lane, so both products run over
// pairs of their depth axis:
//   S^T = K Q^T: the depth is the head dim. The block's queries are packed as pairs, lane = query
//     (qt[p * kQBlock + r] = (q[r][2p], q[r][2p + 1]) as one 32-bit lane), a key's pair broadcast;
//   O += P V: the depth is the key. Each key block's p (float32, keys x queries from the softmax)
//     is rounded into pairs of keys, lane = query (p2[jp * kQBlock + r] = (p[2jp][r], p[2jp+1][r])),
//     and the values are packed as pairs of keys, lane = value column
//     (vp[jp * d + c] = (v[2jp][c], v[2jp + 1][c])), one p pair broadcast per query row.
// Key blocks therefore start and end on even keys (kKeyStep 2); an odd length gets one zero
// padding key, masked like any other.
#pragma once
#include "attention_vec.h"

#if !defined(EDGEPLAID_ISA_BF16)
#error "attention_bf16.h needs the avx512bf16 unit (vdpbf16ps)"
#endif

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {
namespace attention_vec {

struct Bf16Heads {
  using Elem = uint16_t;                  // bf16 bits
  using QElem = uint32_t;                 // a pair of the queries' bf16
  static constexpr int64_t kKeyStep = 2;  // pairs of keys
  static constexpr int kExpDegree = 4;    // p is rounded to bf16 (4e-3): a degree-4 polynomial's 5e-5 is plenty
  struct Scratch {
    // p of the key block, rounded: p2[jp * kQBlock + r] = (p[2jp][r], p[2jp + 1][r]).
    std::vector<uint32_t> p2 = std::vector<uint32_t>(size_t(kKBlock / 2 * kQBlock), 0u);
  };

  // p of keys j, j + 1 (one query vector) rounded to bf16 (nearest even) and paired, as the
  // value tiles broadcast them. The float32 e still sum into l (softmax_block), as the reference.
  // One conversion of both vectors (e[0]'s bf16 in elements 0-15, e[1]'s in 16-31) and one word
  // permutation into pairs: 2 instructions where widening each half and merging them took 6.
  static EP_INLINE void emit_p(const Vec (&e)[2], int64_t j, int64_t vq, float*, Scratch& scratch) {
    alignas(64) static constexpr uint16_t kPairs[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e[1].v, e[0].v);
    _mm512_storeu_si512(scratch.p2.data() + (j / 2) * kQBlock + vq * W,
                        _mm512_permutexvar_epi16(_mm512_load_si512(kPairs), both));
  }

  static EP_INLINE uint32_t pair_at(const uint16_t* x) {
    uint32_t w;
    std::memcpy(&w, x, sizeof w);  // x[0] in the low half, x[1] in the high one (little endian)
    return w;
  }

  // One (batch, head), l keys padded to lk = l rounded up to even (zeros):
  //   kp[j * d + e] = k[j][e] (rows, read as pairs of dims); vp as pairs of keys, 32-bit lanes
  //   vp32[jp * d + c] = v[2jp][c] | v[2jp + 1][c] << 16.
  static void pack(const uint16_t* k, int64_t k_step, const uint16_t* v, int64_t v_step, int64_t l, int64_t d,
                   uint16_t* kp, uint16_t* vp) {
    const int64_t lk = (l + 1) / 2 * 2;
    for (int64_t j = 0; j < lk; ++j) {
      if (j < l) std::memcpy(kp + j * d, k + j * k_step, size_t(d) * 2);
      else std::memset(kp + j * d, 0, size_t(d) * 2);
    }
    uint32_t* vp32 = reinterpret_cast<uint32_t*>(vp);
    for (int64_t jp = 0; jp < lk / 2; ++jp) {
      const uint16_t* even = v + 2 * jp * v_step;
      const uint16_t* odd = 2 * jp + 1 < l ? v + (2 * jp + 1) * v_step : nullptr;
      for (int64_t c = 0; c < d; c += 16) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + c)));
        const __m512i hi = odd ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + c)))
                               : _mm512_setzero_si512();
        _mm512_storeu_si512(vp32 + jp * d + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }

  // qt[p * kQBlock + r] = (q[r][2p], q[r][2p + 1]) for r < rows, 0 beyond ((d / 2) x kQBlock pairs).
  // Unscaled: the scale multiplies the float32 scores.
  static void load_queries(const uint16_t* q, int64_t q_step, int64_t rows, int64_t d, float, uint32_t* qt) {
    for (int64_t p = 0; p < d / 2; ++p)
      for (int64_t r = 0; r < kQBlock; ++r) qt[p * kQBlock + r] = r < rows ? pair_at(q + r * q_step + 2 * p) : 0u;
  }
  static float score_scale(float qscale) { return qscale; }

  // s[j * kQBlock + lane] = <key j, query lane> * scale + bias[j] (band: finish_scores) for keys
  // [0, n_keys) of kp, query vectors [v0, v0 + QV), NT keys a tile: per pair of dims, QV query
  // vectors loaded and each key's pair
  // broadcast (QV * NT accumulators, 24 of the 32 zmm).
  template <int QV, int NT>
  static EP_INLINE void score_tile(const uint16_t* kp, const uint32_t* qt32, int64_t d, int64_t j, int64_t v0,
                                   const ScoreBlock& block) {
    Vec acc[NT][QV];
#pragma GCC unroll 8
    for (int r = 0; r < NT; ++r)
#pragma GCC unroll 3
      for (int v = 0; v < QV; ++v) acc[r][v] = Vec::zero();
    const uint16_t* keys = kp + j * d;
    for (int64_t p = 0; p < d / 2; ++p) {
      __m512bh qv[QV];
#pragma GCC unroll 3
      for (int v = 0; v < QV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(qt32 + p * kQBlock + (v0 + v) * W);
#pragma GCC unroll 8
      for (int r = 0; r < NT; ++r) {
        const __m512bh b = (__m512bh)_mm512_set1_epi32(int32_t(pair_at(keys + r * d + 2 * p)));
#pragma GCC unroll 3
        for (int v = 0; v < QV; ++v) acc[r][v].v = _mm512_dpbf16_ps(acc[r][v].v, b, qv[v]);
      }
    }
    finish_scores<QV, NT>(acc, j, v0, block);
  }

  static void scores(const uint16_t* kp, const uint32_t* qt32, int64_t d, int64_t n_keys, int64_t n_qvecs,
                     const ScoreBlock& block) {
    for (int64_t v0 = 0; v0 < n_qvecs; v0 += kQVecs) {
      const int64_t nv = std::min<int64_t>(kQVecs, n_qvecs - v0);
      const auto run = [&](auto qv) {
        constexpr int QV = decltype(qv)::value, NT = tile_rows<QV>();
        int64_t j = 0;
        for (; j + NT <= n_keys; j += NT) score_tile<QV, NT>(kp, qt32, d, j, v0, block);
        for (; j < n_keys; ++j) score_tile<QV, 1>(kp, qt32, d, j, v0, block);
      };
      if (nv == 3) run(std::integral_constant<int, 3>{});
      else if (nv == 2) run(std::integral_constant<int, 2>{});
      else run(std::integral_constant<int, 1>{});
    }
  }

  // The P V product (value_tile): pairs of keys, p from emit_p's pairs (n_keys even), values as
  // pairs of keys; one broadcast p pair a vdpbf16ps.
  using Lane = uint32_t;
  using VReg = __m512bh;
  static EP_INLINE VReg load_v(const uint32_t* v) { return (__m512bh)_mm512_loadu_si512(v); }
  static EP_INLINE VReg broadcast_p(const uint32_t* p) { return (__m512bh)_mm512_set1_epi32(int32_t(*p)); }
  static EP_INLINE Vec madd(Vec acc, VReg p, VReg v) { return {_mm512_dpbf16_ps(acc.v, p, v)}; }
  static const uint32_t* p_rows(const float*, Scratch& scratch) { return scratch.p2.data(); }
  static const uint32_t* v_rows(const uint16_t* vp) { return reinterpret_cast<const uint32_t*>(vp); }

  // out[e] = bf16(o[e] * inv), e < d (a multiple of 16), rounded to nearest even.
  static void store_row(const float* o, float inv, int64_t d, uint16_t* out) {
    const __m512 f = _mm512_set1_ps(inv);
    for (int64_t e = 0; e < d; e += W)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + e),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + e), f)));
  }
};

}  // namespace attention_vec
}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
