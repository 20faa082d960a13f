// attention: softmax(q k^T * scale, masked) v. Semantics in ops.h (AttentionArgs). The amx unit
// compiles the bf16 tile kernel below (the encoder's attention layers on CPUs with AMX-BF16); the
// avx512bf16 unit the bf16 vector kernel (attention_bf16.h: vdpbf16ps, CPUs with AVX512-BF16 and
// no AMX); the base ISAs the float32 one (attention_vec.h), over the same driver.
//
// edgeplaid-isa: amx avx512bf16 (the tile instructions; vdpbf16ps)
//
// Why a kernel: torch's CPU flash attention ran the 17m encoder's heads (64 dims, a few hundred
// positions) at 300-340 GFLOP/s in bf16 on 2 Xeon cores, 40% of the bf16 forward, while one AMX
// tile product (TDPBF16PS: 16 x 16 outputs, 32-deep) does 1,024 FLOP a cycle per core.
//
// How, per (batch, head), the work unit of the threads:
//   1. Keys and values are packed once into the tile layouts the products read (pairs of
//      consecutive depth elements side by side: K^T tiles of 16 keys x 32 dims, V tiles of 32
//      keys x 16 dims), zero-padded to a multiple of 32 keys.
//   2. For each block of 16 queries, the keys it may see (the window's span, rounded out to 32)
//      are scored in 16 x 16 fp32 tiles into a row buffer; the softmax runs in AVX-512 on whole
//      rows (exact max, exp2 polynomial, masks by key validity and window), writes p in bf16 and
//      keeps 1 / sum in fp32: no online rescaling, the rows are at most L long (32 KiB at 8,192).
//   3. p v accumulates in D / 16 fp32 tiles over the span; rows are scaled by 1 / sum, rounded to
//      bf16 and stored.
// Tiles: 0-3 the output accumulators, 4-5 two score tiles, 6 the A operand (queries or p), 7 the
// B operand (packed keys or values). D must be 32 or 64 (bindings.cpp checks).
#pragma once
#include "amx_tiles.h"
#include "ops.h"
#include "parallel.h"
#include "simd.h"

#if defined(EDGEPLAID_ISA_BF16)
#include "attention_bf16.h"
namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {
void attention(const AttentionArgs& a) { attention_vec::run<attention_vec::Bf16Heads>(a); }
}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
#elif !defined(EDGEPLAID_ISA_AMX)
#include "attention_vec.h"
namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {
void attention(const AttentionArgs& a) { attention_vec::run<attention_vec::F32Heads>(a); }
}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
#else
namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

namespace {

constexpr int64_t kRows = 16;  // queries per block: a tile's rows
constexpr int64_t kSpan = 32;  // keys per p v step: a bf16 tile's depth

// 16 fp32 -> 16 bf16, round to nearest even (inputs finite).
EP_INLINE __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// Keys / values of one (batch, head) in tile layouts; n_keys rounded up to kSpan, zeros beyond l.
//   kp[((kb * chunks + c) * 16 + r) * 32 + 2 * n + e] = k[kb * 16 + n][c * 32 + 2 * r + e]
//   vp[((vb * dtiles + t) * 16 + r) * 32 + 2 * n + e] = v[vb * 32 + 2 * r + e][t * 16 + n]
void pack_keys_values(const uint16_t* k, int64_t k_step, const uint16_t* v, int64_t v_step, int64_t l,
                      int64_t d, int64_t n_keys, uint16_t* kp, uint16_t* vp) {
  const int64_t chunks = d / 32, dtiles = d / 16;
  // K^T tiles: row r of a tile is dword (dims 2r, 2r + 1) of each of its 16 keys, a 16 x 16 dword
  // transpose: one gather per row (keys past l are masked off and zero).
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t kb = 0; kb < n_keys / 16; ++kb) {
    const int64_t live = std::clamp<int64_t>(l - kb * 16, 0, 16);
    const __mmask16 in = __mmask16((1u << live) - 1u);
    const __m512i rows = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(k_step)));  // in bf16 units
    const uint16_t* base = k + kb * 16 * k_step;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t* dst = reinterpret_cast<int32_t*>(kp + (kb * chunks + c) * 512);
      for (int64_t r = 0; r < 16; ++r) {
        const __m512i at = _mm512_add_epi32(rows, _mm512_set1_epi32(int32_t(c * 32 + 2 * r)));
        _mm512_storeu_si512(dst + r * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, at, base, 2));
      }
    }
  }
  // V tiles: row r holds keys 2r and 2r + 1 interleaved element by element.
  alignas(64) static const uint16_t kZip[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i zip = _mm512_load_si512(kZip);
  for (int64_t vb = 0; vb < n_keys / kSpan; ++vb)
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t key = vb * kSpan + 2 * r;
      for (int64_t t = 0; t < dtiles; ++t) {
        const __m256i even = key < l ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + key * v_step + t * 16))
                                     : _mm256_setzero_si256();
        const __m256i odd = key + 1 < l
                                ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + (key + 1) * v_step + t * 16))
                                : _mm256_setzero_si256();
        const __m512i both = _mm512_permutex2var_epi16(_mm512_castsi256_si512(even), zip, _mm512_castsi256_si512(odd));
        _mm512_storeu_si512(vp + ((vb * dtiles + t) * 16 + r) * 32, both);
      }
    }
}

}  // namespace

void attention(const AttentionArgs& a) {
  const int64_t l = a.l, d = a.d, chunks = d / 32, dtiles = d / 16;
  const int64_t n_keys = (l + kSpan - 1) / kSpan * kSpan;
  // Widest span a block of queries sees: everything, or the window both sides, rounded out.
  const int64_t widest =
      a.window < 0 ? n_keys : std::min(n_keys, (kRows + 2 * a.window + 2 * kSpan) / kSpan * kSpan);
  const __m512 scale = _mm512_set1_ps(a.scale * kLog2e);  // softmax in base 2
  parallel_for(a.b * a.h, 1, [&](int64_t u0, int64_t u1) {
    configure_tiles();
    std::vector<uint16_t> kp(size_t(n_keys * d)), vp(size_t(n_keys * d));
    std::vector<float> scores(size_t(kRows * widest));
    std::vector<uint16_t> probs(size_t(kRows * widest));
    alignas(64) uint16_t qbuf[kRows * 64];
    alignas(64) float obuf[kRows * 64];
    float inv_sum[kRows];
    std::vector<float> bias(static_cast<size_t>(n_keys));  // 0 for a valid key, -inf otherwise
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bi = u / a.h, hi = u % a.h;
      const uint16_t* q = static_cast<const uint16_t*>(a.q) + bi * a.q_strides[0] + hi * a.q_strides[2];
      const uint16_t* k = static_cast<const uint16_t*>(a.k) + bi * a.k_strides[0] + hi * a.k_strides[2];
      const uint16_t* v = static_cast<const uint16_t*>(a.v) + bi * a.v_strides[0] + hi * a.v_strides[2];
      uint16_t* out = static_cast<uint16_t*>(a.out) + bi * a.out_strides[0] + hi * a.out_strides[2];
      pack_keys_values(k, a.k_strides[1], v, a.v_strides[1], l, d, n_keys, kp.data(), vp.data());
      const uint8_t* valid = a.key_valid ? a.key_valid + bi * l : nullptr;
      for (int64_t j = 0; j < n_keys; ++j) bias[j] = j < l && (!valid || valid[j]) ? 0.0f : kNegInf;
      for (int64_t q0 = 0; q0 < l; q0 += kRows) {
        const int64_t rows = std::min(kRows, l - q0);
        for (int64_t i = 0; i < kRows; ++i) {  // the block's queries, zero rows past the end
          if (i < rows) std::memcpy(qbuf + i * d, q + (q0 + i) * a.q_strides[1], size_t(d) * 2);
          else std::memset(qbuf + i * d, 0, size_t(d) * 2);
        }
        int64_t lo = 0, hi_key = n_keys;  // keys [lo, hi_key) in whole spans
        if (a.window >= 0) {
          lo = std::max<int64_t>(0, q0 - a.window) / kSpan * kSpan;
          hi_key = std::min(n_keys, (q0 + kRows + a.window + kSpan - 1) / kSpan * kSpan);
        }
        const int64_t span = hi_key - lo;
        // 1. scores (16 x span fp32), two 16-key tiles per step
        for (int64_t j = 0; j < span; j += kSpan) {
          _tile_zero(4);
          _tile_zero(5);
          const int64_t kb = (lo + j) / 16;
          for (int64_t c = 0; c < chunks; ++c) {
            _tile_loadd(6, qbuf + c * 32, d * 2);
            _tile_loadd(7, kp.data() + (kb * chunks + c) * 512, 64);
            _tile_dpbf16ps(4, 6, 7);
            _tile_loadd(7, kp.data() + ((kb + 1) * chunks + c) * 512, 64);
            _tile_dpbf16ps(5, 6, 7);
          }
          _tile_stored(4, scores.data() + j, span * 4);
          _tile_stored(5, scores.data() + j + 16, span * 4);
        }
        // 2. softmax per row over the allowed keys
        for (int64_t i = 0; i < kRows; ++i) {
          float* s = scores.data() + i * span;
          uint16_t* p = probs.data() + i * span;
          const int64_t qi = q0 + i;
          const __m512i first = _mm512_set1_epi32(int32_t(qi - a.window - lo));
          const __m512i last = _mm512_set1_epi32(int32_t(qi + a.window - lo));
          const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
          __m512 m = _mm512_set1_ps(kNegInf);
          for (int64_t j = 0; j < span; j += 16) {
            __m512 x = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), scale), _mm512_loadu_ps(&bias[lo + j]));
            if (a.window >= 0) {
              const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(j)));
              const __mmask16 in = _mm512_cmp_epi32_mask(idx, first, _MM_CMPINT_NLT) &
                                   _mm512_cmp_epi32_mask(idx, last, _MM_CMPINT_LE);
              x = _mm512_mask_blend_ps(in, _mm512_set1_ps(kNegInf), x);
            }
            _mm512_storeu_ps(s + j, x);
            m = _mm512_max_ps(m, x);
          }
          float mx = _mm512_reduce_max_ps(m);
          if (mx == kNegInf) mx = 0.0f;  // no allowed key: every p is 0, the row is 0
          const __m512 mv = _mm512_set1_ps(mx), floor = _mm512_set1_ps(-1000.0f);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < span; j += 16) {
            // simd.h's degree 5 (relative error < 2e-6, far below bf16's 4e-3 rounding of p);
            // AVX-512's scalef makes x = -1000 exactly 0.
            const __m512 e = exp2_neg<5>(Vec{_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv), floor)}).v;
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16(e));
          }
          const float total = _mm512_reduce_add_ps(sum);
          inv_sum[i] = total > 0.0f ? 1.0f / total : 0.0f;
        }
        // 3. p v into D / 16 accumulator tiles
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t j = 0; j < span; j += kSpan) {
          _tile_loadd(6, probs.data() + j, span * 2);
          const uint16_t* vt = vp.data() + ((lo + j) / kSpan) * dtiles * 512;
          _tile_loadd(7, vt, 64);
          _tile_dpbf16ps(0, 6, 7);
          _tile_loadd(7, vt + 512, 64);
          _tile_dpbf16ps(1, 6, 7);
          if (dtiles == 4) {
            _tile_loadd(7, vt + 1024, 64);
            _tile_dpbf16ps(2, 6, 7);
            _tile_loadd(7, vt + 1536, 64);
            _tile_dpbf16ps(3, 6, 7);
          }
        }
        _tile_stored(0, obuf, d * 4);
        _tile_stored(1, obuf + 16, d * 4);
        if (dtiles == 4) {
          _tile_stored(2, obuf + 32, d * 4);
          _tile_stored(3, obuf + 48, d * 4);
        }
        for (int64_t i = 0; i < rows; ++i) {
          uint16_t* o = out + (q0 + i) * a.out_strides[1];
          const __m512 inv = _mm512_set1_ps(inv_sum[i]);
          for (int64_t e = 0; e < d; e += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + e),
                                to_bf16(_mm512_mul_ps(_mm512_loadu_ps(obuf + i * d + e), inv)));
        }
      }
    }
    _tile_release();
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
#endif  // EDGEPLAID_ISA_BF16 / base ISAs / EDGEPLAID_ISA_AMX
