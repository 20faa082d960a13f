// attention on the vector units: one FlashAttention-2 driver (run<Heads>) over two head types,
// float32 heads (F32Heads, below: scalar, AVX2, AVX-512; the encoder's attention in fp32 and
// int8, and bf16 on CPUs with neither AMX nor AVX512-BF16) and bf16 heads on vdpbf16ps
// (Bf16Heads, attention_bf16.h: the avx512bf16 unit). Semantics in ops.h (AttentionArgs);
// included by attention_impl.h for every unit but AMX.
//
// Why a kernel: at 4,096 tokens 17m's three global layers are ~2/3 of its FLOPs, and torch's CPU
// SDPA ran them at ~65% of a 2-core Zen 4's fp32 FMA peak; its sliding layers went through one
// masked SDPA call per 64-query block. float32 heads: 196 against 162 GFLOP/s on those heads
// (AVX-512 on Zen 4, 85% of the AVX2 peak; AVX2 161), the sliding layers 2x faster in the encoder.
//
// How (FlashAttention-2's loop, on registers and L1/L2): the work unit is (batch, head, block of
// kQBlock queries). The block's queries are transposed once (Heads::load_queries) so that queries
// lie on the vector lanes everywhere: the scores of a key block are S^T (keys x queries), and
// every softmax reduction (a query's maximum and sum over keys) is a lane-wise max / add down the
// keys, with no horizontal reduction. For each block of up to kKBlock keys within the band's reach:
//   1. S^T = K Q^T (Heads::scores): tiles of keys (each key's elements broadcast) x query vectors,
//      their epilogue applying the scale, the key and band masks and the block's maximum per
//      query (finish_scores, shared);
//   2. the running maximum m, p = 2^(s - m) (a degree-6 polynomial on [-1/2, 1/2], relative error
//      < 2e-7), the running sum l, and each query's factor 2^(m_old - m) for what it accumulated
//      so far (softmax_block, shared);
//   3. O = O * factor + P V (accumulate, shared; Heads' multiply-add) in register tiles of kRowsO
//      queries x value vectors (each p broadcast).
// Keys and values are packed once per (batch, head) (Heads::pack). Finally each query's row is
// divided by l (Heads::store_row); a query with no allowed key is 0.
#pragma once
#include "maxsim_core.h"
#include "ops.h"
#include "parallel.h"
#include "simd.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

namespace attention_vec {

constexpr int64_t kQBlock = 48;                    // queries per task: 6 AVX2 / 3 AVX-512 vectors
constexpr int64_t kQVecsBlock = (kQBlock + W - 1) / W;
constexpr int64_t kKBlock = 64;                    // keys per step
constexpr int kQVecs = W >= 16 ? 3 : 2;            // S^T tile: tile_rows<kQVecs>() keys x kQVecs
constexpr int kRowsO = W >= 16 ? 6 : 3;            // P V tile: kRowsO queries x 4 value vectors

// x on the lanes whose query (first + lane) lies in [lo, hi], else -inf (exact as floats below 2^24).
EP_INLINE Vec keep_lanes(Vec x, float first, float lo, float hi) {
#if defined(EDGEPLAID_ISA_AVX512)
  const __m512 at = _mm512_add_ps(_mm512_set1_ps(first), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 in = _mm512_cmp_ps_mask(at, _mm512_set1_ps(lo), _CMP_GE_OQ) &
                       _mm512_cmp_ps_mask(at, _mm512_set1_ps(hi), _CMP_LE_OQ);
  return {_mm512_mask_blend_ps(in, _mm512_set1_ps(kNegInf), x.v)};
#elif defined(EDGEPLAID_ISA_AVX2)
  const __m256 at = _mm256_add_ps(_mm256_set1_ps(first), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 in = _mm256_and_ps(_mm256_cmp_ps(at, _mm256_set1_ps(lo), _CMP_GE_OQ),
                                  _mm256_cmp_ps(at, _mm256_set1_ps(hi), _CMP_LE_OQ));
  return {_mm256_blendv_ps(_mm256_set1_ps(kNegInf), x.v, in)};
#else
  return {first >= lo && first <= hi ? x.v : kNegInf};
#endif
}

// A key block's scores and what they need: bias[j] (0, or -inf for a masked key) and scale
// applied to the raw products, the band (queries i with |i - key| <= window; window < 0: none)
// relative to the block's first query and first key, and max: the scores' maximum per query lane.
struct ScoreBlock {
  const float* bias;  // the block's first key's
  float scale;
  int64_t first_query, first_key, window;
  float* s;    // (keys, kQBlock)
  float* max;  // (kQVecsBlock * W)
};

// The score tiles' epilogue (Heads::scores), from the registers: the scores of keys [j, j + NT)
// for query vectors [v0, v0 + QV) times scale plus each key's bias, -inf outside the band, into
// s[key * kQBlock + lane], and the block's running maximum per lane (a pass of its own over the
// scores before: 3-4% of the bf16 kernel's time at 4,096 tokens on a Zen 4).
template <int QV, int NT>
EP_INLINE void finish_scores(Vec (&acc)[NT][QV], int64_t j, int64_t v0, const ScoreBlock& b) {
  const Vec sc = Vec::set1(b.scale);
  Vec mx[QV];
#pragma GCC unroll 3
  for (int v = 0; v < QV; ++v) mx[v] = Vec::load(b.max + (v0 + v) * W);
#pragma GCC unroll 8
  for (int r = 0; r < NT; ++r) {
    const Vec bias = Vec::set1(b.bias[j + r]);
    const int64_t key = b.first_key + j + r;
#pragma GCC unroll 3
    for (int v = 0; v < QV; ++v) {
      Vec x = fmadd(acc[r][v], sc, bias);  // scale 1: exactly acc + bias
      const int64_t q_lo = b.first_query + (v0 + v) * W;
      if (b.window >= 0 && (q_lo < key - b.window || q_lo + W - 1 > key + b.window))
        x = keep_lanes(x, float(q_lo), float(key - b.window), float(key + b.window));
      x.store(b.s + (j + r) * kQBlock + (v0 + v) * W);
      mx[v] = max(mx[v], x);
    }
  }
#pragma GCC unroll 3
  for (int v = 0; v < QV; ++v) mx[v].store(b.max + (v0 + v) * W);
}

// Step 2 for one key block: s (n_keys rows of kQBlock final scores from Heads::scores, query
// vectors [0, n_qvecs); block_max their maximum per lane) gives p = 2^(s - m), handed to
// Heads::emit_p kKeyStep keys at a time (float32 heads: back into s; bf16 heads: rounded into
// pairs in the scratch); the running maximum m, sum and each query's rescaling factor
// (kQVecsBlock * W lanes) are updated.
template <class Heads>
inline void softmax_block(float* s, const float* block_max, int64_t n_keys, int64_t n_qvecs, float* m, float* sum,
                          float* factor, typename Heads::Scratch& scratch) {
  constexpr int64_t kStep = Heads::kKeyStep;
  for (int64_t vq = 0; vq < n_qvecs; ++vq) {
    const Vec mx = Vec::load(block_max + vq * W);
    const Vec m_old = Vec::load(m + vq * W), m_new = max(m_old, mx);
    m_new.store(m + vq * W);
    // A query with no allowed key yet (m_new = -inf) uses 0 as its maximum: its p are all
    // 2^-126 (at most), and it is zeroed at the end.
    float mn[W];
    m_new.store(mn);
    for (int i = 0; i < W; ++i) mn[i] = mn[i] == kNegInf ? 0.0f : mn[i];
    const Vec neg = Vec::load(mn) * Vec::set1(-1.0f), floor = Vec::set1(-126.0f);
    const Vec f = exp2_neg<6>(max(m_old + neg, floor));  // m_old = -inf: 2^-126, ~0
    Vec total = Vec::zero();
    for (int64_t j = 0; j < n_keys; j += kStep) {  // n_keys is a multiple of kStep
      Vec e[kStep];
      for (int64_t t = 0; t < kStep; ++t) {
        e[t] = exp2_neg<Heads::kExpDegree>(max(Vec::load(s + (j + t) * kQBlock + vq * W) + neg, floor));
        total = total + e[t];
      }
      Heads::emit_p(e, j, vq, s, scratch);
    }
    fmadd(Vec::load(sum + vq * W), f, total).store(sum + vq * W);
    f.store(factor + vq * W);
  }
}

// o[r * d + c * W ..] = o * factor[r] + acc[r][c] for r < kRowsO, c < CV: a value tile's epilogue.
template <int CV>
EP_INLINE void scale_add_tile(const Vec (&acc)[kRowsO][CV], const float* factor, float* o, int64_t d) {
#pragma GCC unroll 6
  for (int r = 0; r < kRowsO; ++r) {
    const Vec f = Vec::set1(factor[r]);
    float* dst = o + r * d;
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) fmadd(Vec::load(dst + c * W), f, acc[r][c]).store(dst + c * W);
  }
}

// The value tiles' column split: CV vectors a tile, the widest of 4 / 2 / 1 that divides d / W.
inline int value_vectors(int64_t d) { return (d / W) % 4 == 0 ? 4 : (d / W) % 2 == 0 ? 2 : 1; }

// float32 heads: keys and values packed as contiguous float32 rows, the block's queries
// transposed and pre-scaled by scale * log2 e, S^T through MaxSim's micro-kernel (dot_tile), p
// read straight from the score rows.
struct F32Heads {
  using Elem = float;
  using QElem = float;                    // the transposed queries' element
  static constexpr int64_t kKeyStep = 1;  // key blocks start anywhere
  static constexpr int kExpDegree = 6;    // p stays float32
  struct Scratch {};

  // p of key j (one query vector) back into its score row, where the value tiles read it.
  static EP_INLINE void emit_p(const Vec (&e)[1], int64_t j, int64_t vq, float* s, Scratch&) {
    e[0].store(s + j * kQBlock + vq * W);
  }

  // Rows of one (batch, head): kp[j * d ..] = k[j], vp[j * d ..] = v[j], j < l (= padded l).
  static void pack(const float* k, int64_t k_step, const float* v, int64_t v_step, int64_t l, int64_t d, float* kp,
                   float* vp) {
    for (int64_t j = 0; j < l; ++j) {
      std::memcpy(kp + j * d, k + j * k_step, size_t(d) * sizeof(float));
      std::memcpy(vp + j * d, v + j * v_step, size_t(d) * sizeof(float));
    }
  }

  // qt[e * kQBlock + r] = q[first + r][e] * qscale for r < rows, 0 beyond (d x kQBlock floats).
  static void load_queries(const float* q, int64_t q_step, int64_t rows, int64_t d, float qscale, float* qt) {
    for (int64_t e = 0; e < d; ++e)
      for (int64_t r = 0; r < kQBlock; ++r) qt[e * kQBlock + r] = r < rows ? q[r * q_step + e] * qscale : 0.0f;
  }
  static float score_scale(float) { return 1.0f; }  // already in qt

  // S^T of keys [0, n_keys) (kp: the first key's row, rows d apart) for query vectors
  // [0, n_qvecs): the block's s[j * kQBlock + lane] = <key j, query lane> * scale + bias[j] (or
  // -inf outside the band), through MaxSim's micro-kernel (dot_tile: the keys are its rows, the
  // transposed queries its query vectors) and finish_scores.
  static void scores(const float* kp, const float* qt, int64_t d, int64_t n_keys, int64_t n_qvecs,
                     const ScoreBlock& block) {
    for (int64_t v0 = 0; v0 < n_qvecs; v0 += kQVecs) {
      const int64_t nv = std::min<int64_t>(kQVecs, n_qvecs - v0);
      const auto run = [&](auto qv, auto dd) {
        constexpr int QV = decltype(qv)::value, DIM = decltype(dd)::value;
        const auto tile = [&](auto nt, int64_t j) {
          constexpr int NT = decltype(nt)::value;
          Vec acc[NT][QV];
          dot_tile<QV, NT, DIM>(qt + v0 * W, kQBlock, kp + j * d, d, acc);
          finish_scores<QV, NT>(acc, j, v0, block);
        };
        constexpr int NT = tile_rows<QV>();
        int64_t j = 0;
        for (; j + NT <= n_keys; j += NT) tile(std::integral_constant<int, NT>{}, j);
        for (; j < n_keys; ++j) tile(std::integral_constant<int, 1>{}, j);
      };
      with_fixed_dim(d, [&](auto dd) {
        if (nv == kQVecs) run(std::integral_constant<int, kQVecs>{}, dd);
        else if (kQVecs > 2 && nv == 2) run(std::integral_constant<int, 2>{}, dd);
        else run(std::integral_constant<int, 1>{}, dd);
      });
    }
  }

  // The P V product (value_tile): p read from the score rows, one float32 broadcast an FMA.
  using Lane = float;
  using VReg = Vec;
  static EP_INLINE VReg load_v(const float* v) { return Vec::load(v); }
  static EP_INLINE VReg broadcast_p(const float* p) { return Vec::set1(*p); }
  static EP_INLINE Vec madd(Vec acc, VReg p, VReg v) { return fmadd(p, v, acc); }
  static const float* p_rows(const float* s, Scratch&) { return s; }
  static const float* v_rows(const float* vp) { return vp; }

  // out[e] = o[e] * inv, e < d.
  static void store_row(const float* o, float inv, int64_t d, float* out) {
    for (int64_t e = 0; e < d; ++e) out[e] = o[e] * inv;
  }
};

// o[r * d + c0 ..] = o * factor[r] + sum_{t < n_steps} p[t * kQBlock + r] . v[t * d + c0 ..] for
// r < kRowsO, CV vectors from column c0: step t is one key (float32 heads: an FMA) or a pair of
// keys (bf16 heads: vdpbf16ps), p from the tile's first query, v from the key block's first step.
template <class Heads, int CV>
EP_INLINE void value_tile(const typename Heads::Lane* p, const typename Heads::Lane* v, int64_t n_steps, int64_t c0,
                          const float* factor, float* o, int64_t d) {
  Vec acc[kRowsO][CV];
#pragma GCC unroll 6
  for (int r = 0; r < kRowsO; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) acc[r][c] = Vec::zero();
  const typename Heads::Lane* vr = v + c0;
  for (int64_t t = 0; t < n_steps; ++t, vr += d) {
    typename Heads::VReg vv[CV];
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) vv[c] = Heads::load_v(vr + c * W);
#pragma GCC unroll 6
    for (int r = 0; r < kRowsO; ++r) {
      const typename Heads::VReg b = Heads::broadcast_p(p + t * kQBlock + r);
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) acc[r][c] = Heads::madd(acc[r][c], b, vv[c]);
    }
  }
  scale_add_tile<CV>(acc, factor, o + c0, d);
}

// Step 3: O = O * factor + P V for the block's first `rows` queries (kRowsO at a time: rows past
// them compute what they compute) over n_steps steps of v (the key block's first).
template <class Heads>
void accumulate(const typename Heads::Lane* p, const typename Heads::Lane* v, int64_t n_steps, int64_t rows,
                int64_t d, const float* factor, float* o) {
  const int cv = value_vectors(d);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsO)
    for (int64_t c0 = 0; c0 < d; c0 += cv * W) {
      if (cv == 4) value_tile<Heads, 4>(p + r0, v, n_steps, c0, factor + r0, o + r0 * d, d);
      else if (cv == 2) value_tile<Heads, 2>(p + r0, v, n_steps, c0, factor + r0, o + r0 * d, d);
      else value_tile<Heads, 1>(p + r0, v, n_steps, c0, factor + r0, o + r0 * d, d);
    }
}

// The driver: Heads (F32Heads, or Bf16Heads in the avx512bf16 unit) supplies the packing, the two
// products and the element type; the masks, the online softmax and the threading are shared.
template <class Heads>
void run(const AttentionArgs& a) {
  using Elem = typename Heads::Elem;
  const int64_t b = a.b, l = a.l, h = a.h, d = a.d;
  const int64_t lk = (l + Heads::kKeyStep - 1) / Heads::kKeyStep * Heads::kKeyStep;  // keys, padded
  const Elem* q = static_cast<const Elem*>(a.q);
  const Elem* k = static_cast<const Elem*>(a.k);
  const Elem* v = static_cast<const Elem*>(a.v);
  Elem* out = static_cast<Elem*>(a.out);
  // Keys and values packed per (batch, head) (rows of the fused QKV output lie 3 x hidden
  // elements apart: a key block's rows would share a few L1 sets), bias per (batch, key): 0, or
  // -inf (masked, or padding). One call_buffer, which the calling thread keeps between calls (an
  // encoder calls once a layer with the same shapes: fresh pages for 4 MiB of values cost ~1.5 ms
  // a call, as much as 16 x 256-token heads' attention itself).
  const int64_t rows_size = b * h * lk * d;                                      // elements
  const int64_t rows_floats = (rows_size * int64_t(sizeof(Elem)) + 63) / 64 * 16;  // whole cache lines
  std::vector<float> fallback;
  float* const buf = call_buffer(2 * rows_floats + b * lk, fallback);
  Elem* const kp = reinterpret_cast<Elem*>(buf);
  Elem* const vp = reinterpret_cast<Elem*>(buf + rows_floats);
  float* const bias = buf + 2 * rows_floats;
  parallel_for(b * h, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bi = u / h, hi = u % h;
      Heads::pack(k + bi * a.k_strides[0] + hi * a.k_strides[2], a.k_strides[1],
                  v + bi * a.v_strides[0] + hi * a.v_strides[2], a.v_strides[1], l, d, kp + u * lk * d,
                  vp + u * lk * d);
      if (hi == 0) {
        const uint8_t* valid = a.key_valid ? a.key_valid + bi * l : nullptr;
        for (int64_t j = 0; j < lk; ++j) bias[bi * lk + j] = j < l && (!valid || valid[j]) ? 0.0f : kNegInf;
      }
    }
  });
  const float qscale = a.scale * kLog2e;  // the softmax in base 2
  const float score_scale = Heads::score_scale(qscale);
  const int64_t n_qblocks = (l + kQBlock - 1) / kQBlock;
  parallel_for(b * h * n_qblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<typename Heads::QElem> qt(size_t(d * kQBlock));
    std::vector<float> s(size_t(kKBlock * kQBlock)), o(size_t(kQBlock * d));
    alignas(64) float m[kQVecsBlock * W], sum[kQVecsBlock * W], factor[kQVecsBlock * W], block_max[kQVecsBlock * W];
    typename Heads::Scratch scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u = t / n_qblocks, q0 = (t % n_qblocks) * kQBlock, bi = u / h, hi = u % h;
      const int64_t rows = std::min(kQBlock, l - q0), n_qvecs = (rows + W - 1) / W;
      Heads::load_queries(q + bi * a.q_strides[0] + hi * a.q_strides[2] + q0 * a.q_strides[1], a.q_strides[1], rows,
                          d, qscale, qt.data());
      std::fill(o.begin(), o.end(), 0.0f);
      std::fill(m, m + kQVecsBlock * W, kNegInf);
      std::fill(sum, sum + kQVecsBlock * W, 0.0f);
      std::fill(factor, factor + kQVecsBlock * W, 0.0f);
      int64_t lo = 0, hi_key = lk;  // the keys any query of the block may see, in whole key steps
      if (a.window >= 0) {
        lo = std::max<int64_t>(0, q0 - a.window) / Heads::kKeyStep * Heads::kKeyStep;
        hi_key = std::min(lk, (q0 + rows + a.window + Heads::kKeyStep - 1) / Heads::kKeyStep * Heads::kKeyStep);
      }
      const Elem* ks = kp + u * lk * d;
      const Elem* vs = vp + u * lk * d;
      const float* bb = bias + bi * lk;
      for (int64_t j0 = lo; j0 < hi_key; j0 += kKBlock) {
        const int64_t nk = std::min(kKBlock, hi_key - j0);  // a multiple of kKeyStep
        std::fill(block_max, block_max + kQVecsBlock * W, kNegInf);
        const ScoreBlock block{bb + j0, score_scale, q0, j0, a.window, s.data(), block_max};
        Heads::scores(ks + j0 * d, qt.data(), d, nk, n_qvecs, block);
        softmax_block<Heads>(s.data(), block_max, nk, n_qvecs, m, sum, factor, scratch);
        accumulate<Heads>(Heads::p_rows(s.data(), scratch), Heads::v_rows(vs + j0 * d), nk / Heads::kKeyStep, rows, d,
                          factor, o.data());
      }
      Elem* os = out + bi * a.out_strides[0] + hi * a.out_strides[2] + q0 * a.out_strides[1];
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = m[r] == kNegInf || !(sum[r] > 0.0f) ? 0.0f : 1.0f / sum[r];
        Heads::store_row(o.data() + r * d, inv, d, os + r * a.out_strides[1]);
      }
    }
  });
}

}  // namespace attention_vec

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
