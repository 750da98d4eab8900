// Int8 Linear kernels for decode on CPU: y = x W^T + b with W on a per-row int8 grid, or (Layer.bits 4) on an
// int4 grid with one scale per row and group of columns (the int4 section below).
//
// Activations: each token (row of x) is quantized to uint8 with its own scale and zero point.
// Weights: either bitmask-packed (one mask bit per weight, 64-weight words, the nonzero int8 values
// packed row by row) or dense int8 rows padded to a multiple of 64.
// Integer part: acc = sum_k xq[k] * w[k] in int32; out = wscale[r] * xscale[t] * (acc - zp[t] * rowsum[r]) + b[r].
//
// Two code paths give identical integers (and, with -ffp-contract=off, identical floats):
//   fast:   AVX-512 VBMI2 vpexpandb puts 64 packed weights in place under a 64-bit mask,
//           VNNI vpdpbusd multiplies them with 64 uint8 activations into 16 int32 lanes;
//   scalar: plain C++, for machines without these instructions (or when forced).
// The fast path is compiled with a function-level target attribute and chosen at run time.
// Threads (a small pool, below) split the output rows; each loops over tokens in chunks of 8 so a row's
// weights are read once per chunk.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define FAST_TARGET "avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,popcnt"

namespace {

constexpr int MAX_TOKENS = 8;  // tokens per pass over a row's weights
constexpr int GROUP = 4;       // rows per work item
constexpr int PREFETCH_BYTES = 256;  // how far ahead in a row's packed values to prefetch
constexpr int DENSE_PREFETCH = 512;  // the same for the dense layouts
constexpr int DENSE_PREFETCH_WIDE = 2048;  // dense int8 at batch 5-8 (more work per byte: further ahead)
// Further ahead into L2 (prefetcht1): a prefetch into L1 holds one of the core's few line-fill buffers until
// the line arrives, which caps what one core has in flight from DRAM; L2 has more. These took an
// 11264 x 2048 layer's speed from DRAM on 2 threads up 1.3-2x (dense int8 at batch 8, dense and sparse int4,
// sparse int8; docs/sparse-cpu.md).
constexpr int L2_PREFETCH = 8192;         // dense rows (contiguous: it runs into the next rows)
constexpr int L2_PREFETCH_VALUES = 2048;  // a sparse row's packed values
constexpr int L2_PREFETCH_MASK = 1024;    // its mask, in 64-bit words (8 KB)

// A dense row's stream at `at`: into L1 `l1` bytes ahead, into L2 L2_PREFETCH ahead.
__attribute__((always_inline)) inline void prefetch_dense(const void* at, int l1) {
  _mm_prefetch((const char*)at + l1, _MM_HINT_T0);
  _mm_prefetch((const char*)at + L2_PREFETCH, _MM_HINT_T1);
}

// A sparse row's streams at word w: its packed values p (L1 and L2) and, once per line, its mask m (L2).
__attribute__((always_inline)) inline void prefetch_sparse(const void* p, const uint64_t* m, int64_t w) {
  _mm_prefetch((const char*)p + PREFETCH_BYTES, _MM_HINT_T0);  // ahead of the hardware prefetcher
  _mm_prefetch((const char*)p + L2_PREFETCH_VALUES, _MM_HINT_T1);
  if (!(w & 7)) _mm_prefetch((const char*)(m + w + L2_PREFETCH_MASK), _MM_HINT_T1);  // a line: 8 words
}

// One packed Linear (field order mirrors kernel.py's _Layer).
struct Layer {
  int64_t out, in, words;   // words = ceil(in / 64): mask words (and 64-byte blocks) per row
  const uint64_t* mask;     // [out][words]; bit j of word w: column 64w+j is nonzero. null: dense
  const int8_t* values;     // sparse: nonzeros row by row (+64 bytes slack); dense: [out][64*words]
  const int64_t* offsets;   // sparse: index of each row's first nonzero in values, [out+1]
  const int32_t* rowsum;    // sum of each row's int8 weights (zero-point correction)
  const float* scale;       // weight scale per row
  const float* bias;        // [out] or null
  // int4 (appended; bits 0 or 8: the int8 layout above). bits 4: values are nibbles q+8, two per byte
  // (sparse: per mask word ceil(popcount/2) bytes, offsets in bytes; dense: [out][32*words]); no rowsum, no
  // scale: gscale [out][groups] float16 bits, one per row and gsize columns (gsize 32 or a multiple of 64).
  int64_t bits, gsize, groups;
  const uint16_t* gscale;
};

// Quantized activations of n tokens: rows of `stride` bytes (the padding is zero).
struct Acts {
  const uint8_t* q;
  int64_t stride;
  const float* scale;
  const int32_t* zp;
  // dense int4 on the fast path only: per token, per unit (a word when groups are 32 columns, else a group)
  // and lane, 8 * (zp * columns - sum xq) over the lane's columns of the unit (int4 section below)
  const int32_t* k4 = nullptr;
  int64_t k4_stride = 0;  // int32s per token
};

bool cpu_has_fast() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("popcnt");
}

// min/max over the row -> scale (hi-lo)/255 with the range widened to hold 0, zero point round(-lo/s).
void quantize_row(const float* x, int64_t k, int64_t stride, uint8_t* q, float* scale, int32_t* zp) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  float s = (hi - lo) / 255.f;
  if (s == 0.f) s = 1.f;
  float z = std::min(std::max(std::nearbyint(-lo / s), 0.f), 255.f);
  for (int64_t i = 0; i < k; ++i) {
    float v = std::nearbyint(x[i] / s) + z;  // round half to even, as torch.round
    q[i] = (uint8_t)std::min(std::max(v, 0.f), 255.f);
  }
  std::memset(q + k, 0, stride - k);
  *scale = s;
  *zp = (int32_t)z;
}

// The same quantization 16 floats at a time (division and round-half-even are exact IEEE operations,
// min/max exact, so the results are the scalar loop's bit for bit).
__attribute__((target(FAST_TARGET))) void quantize_row_fast(const float* x, int64_t k, int64_t stride, uint8_t* q,
                                                            float* scale, int32_t* zp) {
  __m512 lo = _mm512_setzero_ps(), hi = lo;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  float l = _mm512_reduce_min_ps(lo), h = _mm512_reduce_max_ps(hi);
  for (; i < k; ++i) {
    l = std::min(l, x[i]);
    h = std::max(h, x[i]);
  }
  float s = (h - l) / 255.f;
  if (s == 0.f) s = 1.f;
  float z = std::min(std::max(std::nearbyint(-l / s), 0.f), 255.f);
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z), v0 = _mm512_setzero_ps(), v255 = _mm512_set1_ps(255.f);
  for (i = 0; i + 16 <= k; i += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), v0), v255);
    _mm_storeu_si128((__m128i*)(q + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  for (; i < k; ++i) {
    float v = std::nearbyint(x[i] / s) + z;
    q[i] = (uint8_t)std::min(std::max(v, 0.f), 255.f);
  }
  std::memset(q + k, 0, stride - k);
  *scale = s;
  *zp = (int32_t)z;
}

// ---- fast path, bitmask layout: one row x B tokens. U accumulators per token over consecutive words hide
// vpdpbusd's latency. One row at a time keeps one sequential stream of mask words and one of values, which
// the hardware prefetcher follows (interleaving 4 rows' variable-length streams halved the speed from DRAM).

// Word w of the row into accumulator u of each token.
template <int B, int U>
__attribute__((target(FAST_TARGET), always_inline)) inline void step_fast(const Acts& a, const uint8_t* xq,
                                                                          const uint64_t* m, const int8_t*& p,
                                                                          int64_t w, int u, __m512i (&sum)[B][U]) {
  prefetch_sparse(p, m, w);
  uint64_t bits = m[w];
  __m512i wv = _mm512_maskz_expandloadu_epi8(bits, p);  // vpexpandb: packed nonzeros -> their lanes
  p += _mm_popcnt_u64(bits);
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b)
    sum[b][u] = _mm512_dpbusd_epi32(sum[b][u], _mm512_load_si512((const void*)(xq + b * a.stride + 64 * w)), wv);
}

template <int B>
__attribute__((target(FAST_TARGET))) void row_sparse(const Layer& L, const Acts& a, int64_t t0, int64_t r,
                                                     int32_t* acc) {
  constexpr int U = B == 1 ? 4 : B < 4 ? 2 : 1;
  __m512i sum[B][U];
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) sum[b][u] = _mm512_setzero_si512();
  const int8_t* p = L.values + L.offsets[r];
  const uint64_t* m = L.mask + r * L.words;
  const uint8_t* xq = a.q + t0 * a.stride;
  int64_t w = 0;
  for (; w + U <= L.words; w += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) step_fast<B, U>(a, xq, m, p, w + u, u, sum);
  }
  for (; w < L.words; ++w) step_fast<B, U>(a, xq, m, p, w, 0, sum);
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
    __m512i t = sum[b][0];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) t = _mm512_add_epi32(t, sum[b][u]);
    acc[b] = _mm512_reduce_add_epi32(t);
  }
}

// ---- fast path, dense layout: R rows x B tokens at once, each with its own accumulator (here four
// interleaved row streams read DRAM faster than one).

template <int B, int R>
__attribute__((target(FAST_TARGET))) void rows_dense(const Layer& L, const Acts& a, int64_t t0, int64_t r0,
                                                     int32_t* acc) {
  __m512i sum[B * R];
  const int8_t* p[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) p[r] = L.values + (r0 + r) * 64 * L.words;
#pragma GCC unroll 32
  for (int i = 0; i < B * R; ++i) sum[i] = _mm512_setzero_si512();
  const uint8_t* xq = a.q + t0 * a.stride;
  for (int64_t w = 0; w < L.words; ++w) {
    __m512i x[B];
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) x[b] = _mm512_load_si512((const void*)(xq + b * a.stride + 64 * w));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      prefetch_dense(p[r] + 64 * w, B > 4 ? DENSE_PREFETCH_WIDE : DENSE_PREFETCH);
      __m512i wv = _mm512_loadu_si512((const void*)(p[r] + 64 * w));
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) sum[b * R + r] = _mm512_dpbusd_epi32(sum[b * R + r], x[b], wv);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < B * R; ++i) acc[i] = _mm512_reduce_add_epi32(sum[i]);
}

// ---- scalar path: one row, B tokens

template <bool DENSE>
void rows_scalar(const Layer& L, const Acts& a, int64_t t0, int nb, int64_t r, int32_t* acc) {
  for (int b = 0; b < nb; ++b) {
    const uint8_t* xq = a.q + (t0 + b) * a.stride;
    int32_t s = 0;
    if (DENSE) {
      const int8_t* w = L.values + r * 64 * L.words;
      for (int64_t k = 0; k < 64 * L.words; ++k) s += (int32_t)xq[k] * w[k];
    } else {
      const int8_t* p = L.values + L.offsets[r];
      const uint64_t* m = L.mask + r * L.words;
      for (int64_t w = 0; w < L.words; ++w) {
        for (uint64_t bits = m[w]; bits; bits &= bits - 1)  // each set bit: the next packed value
          s += (int32_t)xq[64 * w + __builtin_ctzll(bits)] * *p++;
      }
    }
    acc[b] = s;
  }
}

// acc[b * stride] of row r for tokens t0.. -> y (and the corrected integers when asked)
void finish(const Layer& L, const Acts& a, int64_t t0, int nb, int64_t r, const int32_t* acc, int stride,
            float* y, int32_t* ints) {
  for (int b = 0; b < nb; ++b) {
    int64_t t = t0 + b;
    int64_t v = (int64_t)acc[b * stride] - (int64_t)a.zp[t] * L.rowsum[r];
    if (ints) ints[t * L.out + r] = (int32_t)v;
    float f = L.scale[r] * a.scale[t] * (float)v;
    if (L.bias) f += L.bias[r];
    y[t * L.out + r] = f;
  }
}

// Rows [r0, r1) x tokens [t0, t0+B) on the fast path.
template <int B, bool DENSE>
__attribute__((target(FAST_TARGET))) void group_fast(const Layer& L, const Acts& a, int64_t t0, int64_t r0,
                                                     int64_t r1, float* y, int32_t* ints) {
  constexpr int R = B <= 4 ? 4 : 2;  // dense: B x-vectors + B*R accumulators within the 32 registers
  int32_t acc[B * R];
  int64_t r = r0;
  if (DENSE) {
    for (; r + R <= r1; r += R) {
      rows_dense<B, R>(L, a, t0, r, acc);
      for (int i = 0; i < R; ++i) finish(L, a, t0, B, r + i, acc + i, R, y, ints);
    }
    for (; r < r1; ++r) {
      rows_dense<B, 1>(L, a, t0, r, acc);
      finish(L, a, t0, B, r, acc, 1, y, ints);
    }
  } else {
    for (; r < r1; ++r) {
      row_sparse<B>(L, a, t0, r, acc);
      finish(L, a, t0, B, r, acc, 1, y, ints);
    }
  }
}

// ---- int4: nibbles expanded to int8 in registers, then the int8 path's VNNI products, per group of columns.
// vpdpbusd's lane l (of 16) sums columns 4l..4l+3 of each 64-column word. Per lane and group the integers
// v = sum xq*w - zp * sum w (the weights' sum counted as they are read, by a VNNI product with ones: no stored
// row sums); each lane keeps its own float sum, f[l] += gscale * (float)v, group after group (groups of 32:
// word after word, lanes 0-7 in the word's first group, 8-15 in its second); then the 16 lane sums are added
// pairwise (sum16) and y = xscale * f (+ bias). Both code paths add the same floats in the same order.
// The dense fast path multiplies the stored offsets u = q + 8 as they are (two instructions a word) and gets the
// same integers v by adding, per unit and lane, 8 * (zp * columns - sum xq), computed once per call (Acts.k4).

// float16 bits -> float (exact; the scales are positive, finite)
inline __attribute__((always_inline)) float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
  float f;
  if (e == 0) {
    f = (float)m * 5.9604644775390625e-08f;  // subnormal: m * 2^-24
    return sign ? -f : f;
  }
  uint32_t bits = sign | ((e == 31 ? 255u : e + 112u) << 23) | (m << 13);
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 16 lane sums, pairwise in a fixed order (both paths)
inline __attribute__((always_inline)) float sum16(float* part) {
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

// the scale of group g of row gs (0 past the last group: a word's padded second half)
inline __attribute__((always_inline)) float group_scale(const Layer& L, const uint16_t* gs, int64_t g) {
  return g < L.groups ? half_to_float(gs[g]) : 0.f;
}

// 32 bytes of nibble pairs -> 64 int8 weights (byte k: weights 2k, 2k+1 from its low, high nibble)
__attribute__((target(FAST_TARGET), always_inline)) inline __m512i nibbles_fast(const uint8_t* p) {
  __m512i t = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
  t = _mm512_ternarylogic_epi32(t, _mm512_slli_epi16(t, 4), _mm512_set1_epi16(0x0F0F), 0xA8);  // (t | t<<4) & 0x0F0F
  return _mm512_sub_epi8(t, _mm512_set1_epi8(8));
}

// Dense layout, word w of a row (`words` words) as its 64 offset weights u = q + 8 in [0, 15], column order:
// a pair of words is one 64-byte block (byte k: column k of the first word low, of the second high); an odd
// last word is a 32-byte block (byte k: its column k low, column 32 + k high). Two or three instructions a
// word, no subtraction: the kernel takes the offset out per group (Acts.k4).
__attribute__((target(FAST_TARGET), always_inline)) inline __m512i dense4_word(const uint8_t* row, int64_t w,
                                                                               int64_t words) {
  if (w < (words & ~int64_t(1))) {
    if (!(w & 1)) prefetch_dense(row + 64 * (w >> 1), DENSE_PREFETCH);
    __m512i blk = _mm512_loadu_si512((const void*)(row + 64 * (w >> 1)));
    if (w & 1) blk = _mm512_srli_epi16(blk, 4);
    return _mm512_and_si512(blk, _mm512_set1_epi8(0x0F));
  }
  const __m256i h = _mm256_loadu_si256((const __m256i*)(row + 64 * (w >> 1))), l4 = _mm256_set1_epi8(0x0F);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(h, l4)),
                            _mm256_and_si256(_mm256_srli_epi16(h, 4), l4), 1);
}

// word w of row r as 64 int8 weights in column order (dense: offset by +8); p walks the packed stream (sparse)
template <bool DENSE>
__attribute__((target(FAST_TARGET), always_inline)) inline __m512i word4_fast(const uint64_t* m, const uint8_t*& p,
                                                                              int64_t w, int64_t words) {
  if (DENSE) return dense4_word(p, w, words);
  prefetch_sparse(p, m, w);
  uint64_t bits = m[w];
  __m512i wv = _mm512_maskz_expand_epi8(bits, nibbles_fast(p));  // vpexpandb: nonzeros -> their lanes
  p += (_mm_popcnt_u64(bits) + 1) / 2;
  return wv;
}

// lane sums += scale * (float)(acc - zp * rs [+ k4 of the unit: dense, whose weights are offset]), and the
// integers into tot
template <int B, bool DENSE, bool INTS>
__attribute__((target(FAST_TARGET), always_inline)) inline void fold4(__m512 sv, const __m512i (&acc)[B], __m512i rs,
                                                                      const __m512i (&zp)[B], const int32_t* k4,
                                                                      int64_t k4_stride, __m512 (&fl)[B],
                                                                      __m512i (&tot)[B]) {
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
    __m512i v = _mm512_sub_epi32(acc[b], _mm512_mullo_epi32(zp[b], rs));
    if (DENSE) v = _mm512_add_epi32(v, _mm512_load_si512((const void*)(k4 + b * k4_stride)));
    fl[b] = _mm512_add_ps(fl[b], _mm512_mul_ps(sv, _mm512_cvtepi32_ps(v)));
    if (INTS) tot[b] = _mm512_add_epi32(tot[b], v);
  }
}

// The row's group scales as floats (sc[groups], sc[groups + 1]: 0, the padded half of a last word), so each
// group broadcasts its scale from memory (a load, not a vector instruction).
__attribute__((target(FAST_TARGET))) inline void row_scales(const Layer& L, const uint16_t* gs, float* sc) {
  int64_t g = 0;
  for (; g + 16 <= L.groups; g += 16)
    _mm512_storeu_ps(sc + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gs + g))));
  for (; g < L.groups; ++g) sc[g] = half_to_float(gs[g]);
  sc[L.groups] = sc[L.groups + 1] = 0.f;
}

// One row x B tokens on the fast path: f[b] (the row's float sum) and itot[b] (its integers' sum).
template <int B, bool DENSE, bool INTS>
__attribute__((target(FAST_TARGET))) void row4_fast(const Layer& L, const Acts& a, int64_t t0, int64_t r, float* f,
                                                    int32_t* itot, float* sc) {
  const uint8_t* p = (const uint8_t*)L.values + (DENSE ? r * 32 * L.words : L.offsets[r]);
  const uint64_t* m = DENSE ? nullptr : L.mask + r * L.words;
  row_scales(L, L.gscale + r * L.groups, sc);
  const uint8_t* xq = a.q + t0 * a.stride;
  const int32_t* k4 = DENSE ? a.k4 + t0 * a.k4_stride : nullptr;
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  __m512i zp[B], tot[B], acc[B];
  __m512 fl[B];
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) zp[b] = _mm512_set1_epi32(a.zp[t0 + b]), tot[b] = zero, fl[b] = _mm512_setzero_ps();
  // token b's activations of word w; the sums of unit u (a word for groups of 32, else a group) into fl/tot
  auto x = [&](int b, int64_t w) __attribute__((target(FAST_TARGET), always_inline)) {
    return _mm512_load_si512((const void*)(xq + b * a.stride + 64 * w));
  };
  auto fold = [&](__m512 sv, int64_t u, const __m512i& rs, const __m512i (&acc)[B])
                  __attribute__((target(FAST_TARGET), always_inline)) {
    fold4<B, DENSE, INTS>(sv, acc, rs, zp, DENSE ? k4 + 16 * u : k4, a.k4_stride, fl, tot);
  };
  if (L.gsize == 32) {  // two groups per word: lanes 0-7 and 8-15
    for (int64_t w = 0; w < L.words; ++w) {
      __m512i wv = word4_fast<DENSE>(m, p, w, L.words);
      __m512i rs = _mm512_dpbusd_epi32(zero, ones, wv);
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) acc[b] = _mm512_dpbusd_epi32(zero, x(b, w), wv);
      fold(_mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc[2 * w]), _mm512_set1_ps(sc[2 * w + 1])), w, rs, acc);
    }
  } else if (L.gsize == 64 || L.gsize == 128) {
    // the common group sizes, unrolled by pairs of words: a dense 64-byte block holds two words, loaded once
    // and split without branches; a group is one word (64) or both (128)
    const int64_t full = DENSE ? (L.words & ~int64_t(1)) : L.words, gw = L.gsize / 64;
    int64_t w = 0;
    for (; w + 2 <= full; w += 2) {
      __m512i u0, u1;
      if (DENSE) {
        const uint8_t* blk = p + 32 * w;
        prefetch_dense(blk, DENSE_PREFETCH);
        __m512i v = _mm512_loadu_si512((const void*)blk);
        u0 = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
        u1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
      } else {
        u0 = word4_fast<false>(m, p, w, L.words);
        u1 = word4_fast<false>(m, p, w + 1, L.words);
      }
      if (gw == 2) {
        __m512i rs = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ones, u0), ones, u1);
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) acc[b] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, x(b, w), u0), x(b, w + 1), u1);
        fold(_mm512_set1_ps(sc[w / 2]), w / 2, rs, acc);
      } else {
        __m512i rs0 = _mm512_dpbusd_epi32(zero, ones, u0), rs1 = _mm512_dpbusd_epi32(zero, ones, u1), acc1[B];
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) {
          acc[b] = _mm512_dpbusd_epi32(zero, x(b, w), u0);
          acc1[b] = _mm512_dpbusd_epi32(zero, x(b, w + 1), u1);
        }
        fold(_mm512_set1_ps(sc[w]), w, rs0, acc);
        fold(_mm512_set1_ps(sc[w + 1]), w + 1, rs1, acc1);
      }
    }
    if (w < L.words) {  // an odd last word: a group of its own
      __m512i u = word4_fast<DENSE>(m, p, w, L.words), rs = _mm512_dpbusd_epi32(zero, ones, u);
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) acc[b] = _mm512_dpbusd_epi32(zero, x(b, w), u);
      fold(_mm512_set1_ps(sc[w / gw]), w / gw, rs, acc);
    }
  } else {
    const int64_t per = L.gsize / 64;  // words per group
    for (int64_t g = 0; g < L.groups; ++g) {
      __m512i rs = zero;
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) acc[b] = zero;
      for (int64_t w = g * per, w1 = std::min(L.words, (g + 1) * per); w < w1; ++w) {
        __m512i wv = word4_fast<DENSE>(m, p, w, L.words);
        rs = _mm512_dpbusd_epi32(rs, ones, wv);
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) acc[b] = _mm512_dpbusd_epi32(acc[b], x(b, w), wv);
      }
      fold(_mm512_set1_ps(sc[g]), g, rs, acc);
    }
  }
  alignas(64) float part[16];
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
    _mm512_store_ps(part, fl[b]);
    f[b] = sum16(part);
    if (INTS) itot[b] = _mm512_reduce_add_epi32(tot[b]);
  }
}

// f, tot of rows [r0, r1) -> y (and ints: each token's integer sum over groups)
inline void finish4(const Layer& L, const Acts& a, int64_t t0, int nb, int64_t r, const float* f, const int32_t* tot,
                    float* y, int32_t* ints) {
  for (int b = 0; b < nb; ++b) {
    int64_t t = t0 + b;
    if (ints) ints[t * L.out + r] = tot[b];
    float v = a.scale[t] * f[b];
    if (L.bias) v += L.bias[r];
    y[t * L.out + r] = v;
  }
}

template <int B, bool DENSE>
__attribute__((target(FAST_TARGET))) void group4_fast(const Layer& L, const Acts& a, int64_t t0, int64_t r0,
                                                      int64_t r1, float* y, int32_t* ints) {
  float f[B];
  int32_t tot[B];
  thread_local std::vector<float> sc;
  if ((int64_t)sc.size() < L.groups + 2) sc.resize(L.groups + 2);
  for (int64_t r = r0; r < r1; ++r) {
    if (ints)
      row4_fast<B, DENSE, true>(L, a, t0, r, f, tot, sc.data());
    else
      row4_fast<B, DENSE, false>(L, a, t0, r, f, tot, sc.data());
    finish4(L, a, t0, B, r, f, tot, y, ints);
  }
}

// run(std::integral_constant<int, B>) with B = nb as a compile-time token count (1..8; more: 8)
template <class F>
void with_tokens(int nb, F run) {
  switch (nb) {
    case 1: return run(std::integral_constant<int, 1>());
    case 2: return run(std::integral_constant<int, 2>());
    case 3: return run(std::integral_constant<int, 3>());
    case 4: return run(std::integral_constant<int, 4>());
    case 5: return run(std::integral_constant<int, 5>());
    case 6: return run(std::integral_constant<int, 6>());
    case 7: return run(std::integral_constant<int, 7>());
    default: return run(std::integral_constant<int, 8>());
  }
}

// Scalar int4: the row's weights decoded into int8 (w, 64*words), then per token the lane sums of row4_fast.
template <bool DENSE>
void group4_scalar(int nb, const Layer& L, const Acts& a, int64_t t0, int64_t r0, int64_t r1, float* y,
                   int32_t* ints) {
  thread_local std::vector<int8_t> w;
  const int64_t n = 64 * L.words;
  w.assign(n, 0);
  float f[MAX_TOKENS];
  int32_t tot[MAX_TOKENS];
  for (int64_t r = r0; r < r1; ++r) {
    if (DENSE) {
      const uint8_t* p = (const uint8_t*)L.values + r * 32 * L.words;
      for (int64_t k = 0; k < n; ++k) {  // dense4_word's layout: blocks of 128 columns (an odd last word: 64)
        int64_t blk = k >> 7, span = 128 * blk + 128 <= n ? 64 : 32, j = k - 128 * blk;
        int nib = (p[64 * blk + j % span] >> (j >= span ? 4 : 0)) & 15;
        w[k] = (int8_t)(nib - 8);
      }
    } else {
      const uint8_t* p = (const uint8_t*)L.values + L.offsets[r];
      std::fill(w.begin(), w.end(), 0);
      for (int64_t wd = 0; wd < L.words; ++wd) {
        uint64_t bits = L.mask[r * L.words + wd];
        int i = 0;
        for (uint64_t b = bits; b; b &= b - 1, ++i)  // the i-th set bit takes the i-th nibble of this word
          w[64 * wd + __builtin_ctzll(b)] = (int8_t)(((p[i >> 1] >> (4 * (i & 1))) & 15) - 8);
        p += (__builtin_popcountll(bits) + 1) / 2;
      }
    }
    const uint16_t* gs = L.gscale + r * L.groups;
    // units: a word (groups of 32) or a group of words; lane l of a unit: columns 64w+4l..64w+4l+3 of its words
    const bool halves = L.gsize == 32;
    const int64_t units = halves ? L.words : L.groups, per = halves ? 1 : L.gsize / 64;
    for (int b = 0; b < nb; ++b) {
      const uint8_t* xq = a.q + (t0 + b) * a.stride;
      const int32_t zp = a.zp[t0 + b];
      float part[16] = {};
      tot[b] = 0;
      for (int64_t u = 0; u < units; ++u) {
        for (int l = 0; l < 16; ++l) {
          int32_t acc = 0, sum_w = 0;
          for (int64_t wd = u * per, w1 = std::min(L.words, (u + 1) * per); wd < w1; ++wd)
            for (int j = 0; j < 4; ++j) {
              int64_t k = 64 * wd + 4 * l + j;
              acc += (int32_t)xq[k] * w[k];
              sum_w += w[k];
            }
          int32_t v = acc - zp * sum_w;
          float sc = halves ? group_scale(L, gs, 2 * u + (l >= 8)) : half_to_float(gs[u]);
          part[l] += sc * (float)v;
          tot[b] += v;
        }
      }
      f[b] = sum16(part);
    }
    finish4(L, a, t0, nb, r, f, tot, y, ints);
  }
}

template <bool DENSE>
void group_dispatch_fast(int nb, const Layer& L, const Acts& a, int64_t t0, int64_t r0, int64_t r1, float* y,
                         int32_t* ints) {
  with_tokens(nb, [&](auto B) {
    if (L.bits == 4) group4_fast<B(), DENSE>(L, a, t0, r0, r1, y, ints);
    else group_fast<B(), DENSE>(L, a, t0, r0, r1, y, ints);
  });
}

template <bool DENSE>
void group_scalar(int nb, const Layer& L, const Acts& a, int64_t t0, int64_t r0, int64_t r1, float* y,
                  int32_t* ints) {
  if (L.bits == 4) return group4_scalar<DENSE>(nb, L, a, t0, r0, r1, y, ints);
  int32_t acc[MAX_TOKENS];
  for (int64_t r = r0; r < r1; ++r) {
    rows_scalar<DENSE>(L, a, t0, nb, r, acc);
    finish(L, a, t0, nb, r, acc, 1, y, ints);
  }
}


// ---- threads: the caller and up to threads-1 pool workers take chunks of a job from one counter.
// The caller never waits for a worker that has not started: a worker the OS schedules late finds the
// job taken and goes back to sleep. (An OpenMP team waits at its barrier for every thread; on a machine
// busy with other work that stalled each call by a scheduler slice, ~16 ms.) Workers spin briefly
// between jobs (decode calls the kernel every few tens of microseconds), then sleep.

class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t chunk);

  void run(int threads, int64_t chunks, Fn fn, void* ctx) {
    if (threads <= 1 || chunks <= 1) {
      for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
      return;
    }
    std::lock_guard<std::mutex> one_job(job_mutex_);  // one job at a time (callers on several threads)
    grow(threads - 1);
    uint64_t gen = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    Job& job = jobs_[gen & 1];  // the other slot may still be read by a worker late for the last job
    job = Job{fn, ctx, chunks, threads - 1};
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(gen << 32, std::memory_order_release);  // publish: generation, next chunk 0
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
    }
    wake_.notify_all();
    int64_t mine = work(gen, job);
    int64_t target = chunks - mine;  // chunks the workers took: wait for those only
    while (done_.load(std::memory_order_acquire) < target) _mm_pause();
  }

 private:
  struct Job {
    Fn fn;
    void* ctx;
    int64_t chunks;
    int workers;  // how many pool workers may join
  };

  // Take and run chunks of job `gen` until none is left; returns how many this thread ran.
  int64_t work(uint64_t gen, const Job& job) {
    int64_t ran = 0;
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while ((t >> 32) == gen && (int64_t)(t & 0xffffffffu) < job.chunks) {
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        job.fn(job.ctx, (int64_t)(t & 0xffffffffu));
        ++ran;
        t = ticket_.load(std::memory_order_acquire);
      }
    }
    return ran;
  }

  void worker(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      for (int spin = 0; (t >> 32) == seen; ++spin) {
        if (spin < 20000) {
          _mm_pause();
        } else {
          std::unique_lock<std::mutex> lk(sleep_mutex_);
          wake_.wait(lk, [&] { return (ticket_.load(std::memory_order_acquire) >> 32) != seen; });
        }
        t = ticket_.load(std::memory_order_acquire);
      }
      seen = t >> 32;
      const Job& job = jobs_[seen & 1];
      if (index >= job.workers) continue;
      int64_t ran = work(seen, job);
      if (ran) done_.fetch_add(ran, std::memory_order_release);
    }
  }

  void grow(int workers) {
    while ((int)threads_.size() < workers) {
      int index = (int)threads_.size();
      threads_.emplace_back([this, index] { worker(index); });
      threads_.back().detach();  // the pool lives as long as the process
    }
  }

  std::atomic<uint64_t> ticket_{0};  // (generation << 32) | next chunk
  std::atomic<int64_t> done_{0};     // chunks the workers finished in this generation
  Job jobs_[2] = {};
  std::vector<std::thread> threads_;
  std::mutex job_mutex_, sleep_mutex_;
  std::condition_variable wake_;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: detached workers may still be asleep on it at exit
  return *p;
}

template <bool DENSE>
struct LinearJob {
  const Layer& L;
  const Acts& a;
  int64_t n, groups_per_chunk;
  float* y;
  int32_t* ints;
  bool fast;

  static void chunk(void* ctx, int64_t c) {
    auto& j = *static_cast<LinearJob*>(ctx);
    int64_t r_end = std::min(j.L.out, (c + 1) * j.groups_per_chunk * GROUP);
    for (int64_t r0 = c * j.groups_per_chunk * GROUP; r0 < r_end; r0 += GROUP) {
      int64_t r1 = std::min(r0 + GROUP, j.L.out);
      for (int64_t t0 = 0; t0 < j.n; t0 += MAX_TOKENS) {  // this group's weights stay in cache across chunks
        int nb = (int)std::min<int64_t>(MAX_TOKENS, j.n - t0);
        if (j.fast)
          group_dispatch_fast<DENSE>(nb, j.L, j.a, t0, r0, r1, j.y, j.ints);
        else
          group_scalar<DENSE>(nb, j.L, j.a, t0, r0, r1, j.y, j.ints);
      }
    }
  }
};

template <bool DENSE>
void linear(const Layer& L, const Acts& a, int64_t n, float* y, int32_t* ints, int threads, bool fast) {
  int64_t groups = (L.out + GROUP - 1) / GROUP;
  // ~8 chunks per thread: rows differ in nonzeros, and a late thread leaves less undone
  int64_t per = std::max<int64_t>(1, groups / (8 * threads));
  LinearJob<DENSE> job{L, a, n, per, y, ints, fast};
  pool().run(threads, (groups + per - 1) / per, &LinearJob<DENSE>::chunk, &job);
}

// checksum: the sum of the little-endian 64-bit words, then of the bytes past the last whole word
uint64_t read_scalar(const uint8_t* p, int64_t bytes) {
  uint64_t s = 0;
  int64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    s += v;
  }
  for (; i < bytes; ++i) s += p[i];
  return s;
}

__attribute__((target(FAST_TARGET))) uint64_t read_fast(const uint8_t* p, int64_t bytes) {
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    s0 = _mm512_add_epi64(s0, _mm512_loadu_si512((const void*)(p + i)));
    s1 = _mm512_add_epi64(s1, _mm512_loadu_si512((const void*)(p + i + 64)));
    s2 = _mm512_add_epi64(s2, _mm512_loadu_si512((const void*)(p + i + 128)));
    s3 = _mm512_add_epi64(s3, _mm512_loadu_si512((const void*)(p + i + 192)));
  }
  uint64_t s = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
  return s + read_scalar(p + i, bytes - i);
}


struct QuantizeJob {
  const float* x;
  int64_t k, stride;
  uint8_t* q;
  float* scale;
  int32_t* zp;
  bool fast;

  static void chunk(void* ctx, int64_t t) {
    auto& j = *static_cast<QuantizeJob*>(ctx);
    if (j.fast)
      quantize_row_fast(j.x + t * j.k, j.k, j.stride, j.q + t * j.stride, j.scale + t, j.zp + t);
    else
      quantize_row(j.x + t * j.k, j.k, j.stride, j.q + t * j.stride, j.scale + t, j.zp + t);
  }
};

struct ReadJob {  // part t of `threads` equal parts (multiples of 256 bytes; the last takes the rest)
  const uint8_t* p;
  int64_t bytes, part;
  int parts;
  bool fast;
  std::atomic<uint64_t> total;

  static void chunk(void* ctx, int64_t t) {
    auto& j = *static_cast<ReadJob*>(ctx);
    int64_t lo = t * j.part, hi = t == j.parts - 1 ? j.bytes : lo + j.part;
    j.total += j.fast ? read_fast(j.p + lo, hi - lo) : read_scalar(j.p + lo, hi - lo);
  }
};

// Acts.k4 of a dense int4 layer: per token t, unit u and lane l, 8 * (zp * columns - sum of xq) over the lane's
// columns of the unit's words (4 per word), so that acc(xq, q + 8) - zp * sum(q + 8) + k4 = sum (xq - zp) * q.
void dense4_terms(const Layer& L, const Acts& a, int64_t n, int32_t* k4) {
  const int64_t per = L.gsize == 32 ? 1 : L.gsize / 64, units = L.gsize == 32 ? L.words : L.groups;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t u = 0; u < units; ++u) {
      int32_t* k = k4 + t * a.k4_stride + 16 * u;
      const int64_t w0 = u * per, w1 = std::min(L.words, w0 + per);
      for (int l = 0; l < 16; ++l) {
        int32_t x = 0;
        for (int64_t w = w0; w < w1; ++w)
          for (int j = 0; j < 4; ++j) x += a.q[t * a.stride + 64 * w + 4 * l + j];
        k[l] = 8 * (a.zp[t] * 4 * (int32_t)(w1 - w0) - x);
      }
    }
}

// The layer applied to n rows of x: quantize each row, then the integer matmul.
int apply(const Layer& L, const float* x, int64_t n, float* y, int32_t* ints, int threads, bool fast) {
  int64_t stride = 64 * L.words;
  uint8_t* q = (uint8_t*)std::aligned_alloc(64, n * stride);
  float* scale = (float*)std::malloc(n * sizeof(float));
  int32_t* zp = (int32_t*)std::malloc(n * sizeof(int32_t));
  if (!q || !scale || !zp) {
    std::free(q), std::free(scale), std::free(zp);
    return -2;
  }
  QuantizeJob qj{x, L.in, stride, q, scale, zp, fast};
  pool().run(n > 8 ? threads : 1, n, &QuantizeJob::chunk, &qj);
  Acts a{q, stride, scale, zp};
  int32_t* k4 = nullptr;
  if (L.bits == 4 && !L.mask && fast) {
    a.k4_stride = 16 * (L.gsize == 32 ? L.words : L.groups);
    k4 = (int32_t*)std::aligned_alloc(64, n * a.k4_stride * sizeof(int32_t));
    if (!k4) {
      std::free(q), std::free(scale), std::free(zp);
      return -2;
    }
    dense4_terms(L, a, n, k4);
    a.k4 = k4;
  }
  if (L.mask)
    linear<false>(L, a, n, y, ints, threads, fast);
  else
    linear<true>(L, a, n, y, ints, threads, fast);
  std::free(q), std::free(scale), std::free(zp), std::free(k4);
  return 0;
}

// ---- a whole decode step for the Llama family (kernel.py's StepModel mirrors these structs)

struct StepLayer {
  const float* norm1;      // input RMSNorm weight [hidden]
  const float* norm2;      // post-attention RMSNorm weight [hidden]
  const Layer* qkv;        // q, k, v rows stacked
  const Layer* o;
  const Layer* gate_up;    // gate, up rows stacked
  const Layer* down;
  float* k_cache;          // [kv_heads][capacity][head_dim]
  float* v_cache;
};

struct StepModel {
  int64_t layers, hidden, heads, kv_heads, head_dim, inner, capacity;
  float eps, scaling;
  const StepLayer* layer;
  const float* final_norm;
  const Layer* head;
};

// sum of 16 partial sums, pairwise (a fixed order both code paths share; short dependency chains)
inline __attribute__((always_inline)) float hsum16(float* part) {
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

// sum of a[j] * b[j] with 16 independent partial sums (vectorized without reordering one long chain)
inline __attribute__((always_inline)) float dot(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[j + l] * b[j + l];
  float s = hsum16(part);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// e^x, branch-free so loops over it vectorize: x = n ln2 + r (ln2 split in two, Cody-Waite), |r| <= ln2/2,
// e^r by its Taylor series to r^7 (truncation < 6e-9 relative), times 2^n built in the exponent bits.
// Within ~2 ulp of std::exp for x in [-87, 88]; clamped outside (underflow to ~0 is what softmax wants).
inline __attribute__((always_inline)) float exp_approx(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504f + shifter) - shifter;
  float r = (x - n * 0.693145752f) - n * 1.42860677e-06f;
  float e = 1.f / 5040.f;
  e = e * r + 1.f / 720.f;
  e = e * r + 1.f / 120.f;
  e = e * r + 1.f / 24.f;
  e = e * r + 1.f / 6.f;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// y = x / sqrt(mean(x^2) + eps) * w, in the order transformers' LlamaRMSNorm computes it
inline __attribute__((always_inline)) void norm_body(const float* x, const float* w, int64_t n, float eps,
                                                     float* y) {
  float r = 1.f / std::sqrt(dot(x, x, n) / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// act = silu(gate) * up for gu = [gate | up]
inline __attribute__((always_inline)) void silu_body(const float* gu, int64_t inner, float* act) {
  for (int64_t i = 0; i < inner; ++i) {
    float g = gu[i];
    act[i] = g / (1.f + exp_approx(-g)) * gu[inner + i];
  }
}

// x [d] rotated in place: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2])
void rotate(float* x, const float* cos, const float* sin, int64_t d) {
  int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// p [total] (scores) -> the softmax weights in place: exp(p - max) / sum, the sum as 16 partial sums added
// pairwise (a fixed order both code paths share)
inline __attribute__((always_inline)) void softmax_body(float* p, int64_t total) {
  float top = -INFINITY;
  for (int64_t t = 0; t < total; ++t) top = std::max(top, p[t]);
  for (int64_t t = 0; t < total; ++t) p[t] = exp_approx(p[t] - top);
  float part[16] = {};
  int64_t t = 0;
  for (; t + 16 <= total; t += 16)
    for (int l = 0; l < 16; ++l) part[l] += p[t + l];
  float sum = hsum16(part);
  for (; t < total; ++t) sum += p[t];
  for (t = 0; t < total; ++t) p[t] = p[t] / sum;
}

// Attention of the new token's query head i (q [heads][head_dim]) over the `total` cached positions of its
// KV head, into out[i] ([heads][head_dim]); p: this head's scratch [total]. Heads are independent: the
// threads split them.
inline __attribute__((always_inline)) void attend_body(const StepModel& M, const StepLayer& S, const float* q,
                                                       int64_t total, float* p, float* out, int64_t i) {
  const int64_t D = M.head_dim, g = i / (M.heads / M.kv_heads);
  const float* kc = S.k_cache + g * M.capacity * D;
  const float* vc = S.v_cache + g * M.capacity * D;
  for (int64_t t = 0; t < total; ++t) p[t] = dot(q + i * D, kc + t * D, D) * M.scaling;
  softmax_body(p, total);
  float* o = out + i * D;
  std::fill(o, o + D, 0.f);
  for (int64_t t = 0; t < total; ++t)
    for (int64_t j = 0; j < D; ++j) o[j] += p[t] * vc[t * D + j];
}

// The step's float work outside the matmuls, compiled for each code path (the same source, so the same
// results: no fused multiply-adds, no reassociation).
struct StepOps {
  void (*attend)(const StepModel&, const StepLayer&, const float*, int64_t, float*, float*, int64_t);
  void (*norm)(const float*, const float*, int64_t, float, float*);
  void (*silu)(const float*, int64_t, float*);
  bool grouped;  // attention through attend_group_fast where head_dim allows (the AVX-512 path)
};

__attribute__((target(FAST_TARGET))) void attend_fast(const StepModel& M, const StepLayer& S, const float* q,
                                                      int64_t total, float* p, float* out, int64_t i) {
  attend_body(M, S, q, total, p, out, i);
}
__attribute__((target(FAST_TARGET))) void norm_fast(const float* x, const float* w, int64_t n, float eps, float* y) {
  norm_body(x, w, n, eps, y);
}
__attribute__((target(FAST_TARGET))) void silu_fast(const float* gu, int64_t inner, float* act) {
  silu_body(gu, inner, act);
}
void attend_plain(const StepModel& M, const StepLayer& S, const float* q, int64_t total, float* p, float* out,
                  int64_t i) {
  attend_body(M, S, q, total, p, out, i);
}

void norm_plain(const float* x, const float* w, int64_t n, float eps, float* y) { norm_body(x, w, n, eps, y); }
void silu_plain(const float* gu, int64_t inner, float* act) { silu_body(gu, inner, act); }

// attend_body for the query heads [h0, h0 + n) that share one KV head, with AVX-512 and head_dim = 16 * NC:
// each key and value row is loaded once for the n heads, the dot products and the weighted sum of values
// stay in registers, and every float operation is attend_body's in attend_body's order (the 16 partial sums
// of a dot product added pairwise, lane l with l + 8, then l + 4, ...), so the results are the same bit for
// bit. n <= 16 / NC (the value accumulators fill 16 registers).
constexpr int64_t ATTEND_PREFETCH = 8;  // cache rows ahead (the hardware prefetcher alone fell behind)
template <int NC>
__attribute__((target(FAST_TARGET))) void attend_group_fast(const StepModel& M, const StepLayer& S, const float* q,
                                                            int64_t total, float* p, float* out, int64_t h0,
                                                            int64_t n) {
  constexpr int64_t D = 16 * NC;
  const int64_t g = h0 / (M.heads / M.kv_heads);
  const float* kc = S.k_cache + g * M.capacity * D;
  const float* vc = S.v_cache + g * M.capacity * D;
  const __m128 scaling = _mm_set_ss(M.scaling);
  for (int64_t t = 0; t < total; ++t) {
    __m512 k[NC];
    for (int c = 0; c < NC; ++c) {
      _mm_prefetch((const char*)(kc + (t + ATTEND_PREFETCH) * D + 16 * c), _MM_HINT_T0);
      k[c] = _mm512_loadu_ps(kc + t * D + 16 * c);
    }
    for (int64_t i = 0; i < n; ++i) {
      const float* qi = q + (h0 + i) * D;
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < NC; ++c) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(qi + 16 * c), k[c]));
      const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
      __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), hi);
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
      __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
      _mm_store_ss(p + i * total + t, _mm_mul_ss(s1, scaling));
    }
  }
  for (int64_t i = 0; i < n; ++i) softmax_body(p + i * total, total);
  __m512 acc[16];
  for (int64_t j = 0; j < n * NC; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < total; ++t) {
    const float* v = vc + t * D;
    for (int c = 0; c < NC; ++c) {
      _mm_prefetch((const char*)(v + ATTEND_PREFETCH * D + 16 * c), _MM_HINT_T0);
      __m512 vr = _mm512_loadu_ps(v + 16 * c);
      for (int64_t i = 0; i < n; ++i)
        acc[i * NC + c] = _mm512_add_ps(acc[i * NC + c], _mm512_mul_ps(_mm512_set1_ps(p[i * total + t]), vr));
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + (h0 + i) * D + 16 * c, acc[i * NC + c]);
}

// The query heads [h0, h0 + n) of one sequence (n <= heads_per_chunk(M)), all on one KV head.
void attend_heads(const StepOps& ops, const StepModel& M, const StepLayer& S, const float* q, int64_t total,
                  float* p, float* out, int64_t h0, int64_t n) {
  if (ops.grouped && M.head_dim == 64)
    return attend_group_fast<4>(M, S, q, total, p + h0 * total, out, h0, n);
  if (ops.grouped && M.head_dim == 128)
    return attend_group_fast<8>(M, S, q, total, p + h0 * total, out, h0, n);
  for (int64_t i = h0; i < h0 + n; ++i) ops.attend(M, S, q, total, p + i * total, out, i);
}

// Query heads per attention chunk: the registers of attend_group_fast hold 256 floats of weighted values.
int64_t heads_per_chunk(const StepModel& M) {
  const int64_t group = M.heads / M.kv_heads;
  const int64_t fit = std::max<int64_t>(1, 256 / M.head_dim);
  const int64_t blocks = (group + fit - 1) / fit;
  return (group + blocks - 1) / blocks;  // the group split evenly
}

// Every query head of every sequence on the pool, a few heads of one KV group per chunk (each writes only its
// own slice of out and of p). Sequence b attends over its own cache (M[b]'s StepLayer l) up to total[b].
struct AttendJob {
  const StepOps* ops;
  const StepModel* const* M;
  int64_t l, heads, group, per, blocks;  // per: heads per chunk; blocks: chunks per KV group
  const float* q;          // [B][qkv row]: row b's query heads first
  int64_t q_stride;
  const int64_t* total;    // [B]
  const int64_t* p_off;    // [B]: where sequence b's [heads][total[b]] scratch starts in p
  float* p;
  float* out;              // [B][heads * head_dim]

  int64_t chunks_per_seq() const { return heads / group * blocks; }

  static void chunk(void* ctx, int64_t c) {
    auto& j = *static_cast<AttendJob*>(ctx);
    const int64_t per_seq = j.chunks_per_seq(), b = c / per_seq, r = c % per_seq;
    int64_t h0 = (r / j.blocks) * j.group + (r % j.blocks) * j.per;
    int64_t n = std::min(j.per, (r / j.blocks + 1) * j.group - h0);
    const StepModel& M = *j.M[b];
    attend_heads(*j.ops, M, M.layer[j.l], j.q + b * j.q_stride, j.total[b], j.p + j.p_off[b],
                 j.out + b * j.heads * M.head_dim, h0, n);
  }
};

// One decode step for B sequences at once. M[b]: sequence b's model (the same weights in every one; its own
// caches and capacity). h [B][hidden]: the tokens' embeddings (overwritten); pos[b]: sequence b's cached
// tokens (its key and value are written there); cos, sin [B][head_dim]: the rotary tables of pos[b];
// logits [B][vocab] out. Each Linear runs once over the B rows (row b's result does not depend on the
// others: per-row quantization, exact integer sums), norms, rotary and attention per row with the same
// code as one sequence alone, so every row's logits are what a step of that sequence alone gives.
int decode_batch(const StepModel* const* M, int64_t B, float* h, const int64_t* pos, const float* cos,
                 const float* sin, float* logits, int threads, bool fast, double* kernel_s) {
  const StepModel& W = *M[0];  // the weights
  const int64_t H = W.heads, KV = W.kv_heads, D = W.head_dim, hid = W.hidden, QKV = (H + 2 * KV) * D;
  const StepOps ops = fast ? StepOps{attend_fast, norm_fast, silu_fast, true}
                           : StepOps{attend_plain, norm_plain, silu_plain, false};
  std::vector<int64_t> total(B), p_off(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    total[b] = pos[b] + 1;
    p_off[b + 1] = p_off[b] + H * total[b];
  }
  const int64_t per = heads_per_chunk(W);  // query heads per attention chunk
  std::vector<float> x(B * hid), qkv(B * QKV), att(B * H * D), y(B * hid), gu(B * 2 * W.inner),
      act(B * W.inner), p(p_off[B]);
  double spent = 0;
  auto mm = [&](const Layer* L, const float* in, float* out) {
    auto t = std::chrono::steady_clock::now();
    int rc = apply(*L, in, B, out, nullptr, threads, fast);
    spent += std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    return rc;
  };
  for (int64_t l = 0; l < W.layers; ++l) {
    const StepLayer& S = W.layer[l];
    for (int64_t b = 0; b < B; ++b) ops.norm(h + b * hid, S.norm1, hid, W.eps, x.data() + b * hid);
    if (mm(S.qkv, x.data(), qkv.data())) return -2;
    for (int64_t b = 0; b < B; ++b) {
      const StepLayer& C = M[b]->layer[l];  // sequence b's cache
      const int64_t cap = M[b]->capacity;
      float* q = qkv.data() + b * QKV;
      float* k = q + H * D;
      float* v = k + KV * D;
      const float *c = cos + b * D, *s = sin + b * D;
      for (int64_t i = 0; i < H; ++i) rotate(q + i * D, c, s, D);
      for (int64_t g = 0; g < KV; ++g) {
        rotate(k + g * D, c, s, D);
        std::memcpy(C.k_cache + (g * cap + pos[b]) * D, k + g * D, D * sizeof(float));
        std::memcpy(C.v_cache + (g * cap + pos[b]) * D, v + g * D, D * sizeof(float));
      }
    }
    AttendJob job{&ops, M, l, H, H / KV, per, (H / KV + per - 1) / per, qkv.data(), QKV, total.data(),
                  p_off.data(), p.data(), att.data()};
    pool().run(threads, B * job.chunks_per_seq(), &AttendJob::chunk, &job);
    if (mm(S.o, att.data(), y.data())) return -2;
    for (int64_t i = 0; i < B * hid; ++i) h[i] += y[i];
    for (int64_t b = 0; b < B; ++b) ops.norm(h + b * hid, S.norm2, hid, W.eps, x.data() + b * hid);
    if (mm(S.gate_up, x.data(), gu.data())) return -2;
    for (int64_t b = 0; b < B; ++b) ops.silu(gu.data() + b * 2 * W.inner, W.inner, act.data() + b * W.inner);
    if (mm(S.down, act.data(), y.data())) return -2;
    for (int64_t i = 0; i < B * hid; ++i) h[i] += y[i];
  }
  for (int64_t b = 0; b < B; ++b) ops.norm(h + b * hid, W.final_norm, hid, W.eps, x.data() + b * hid);
  if (mm(W.head, x.data(), logits)) return -2;
  if (kernel_s) *kernel_s += spent;
  return 0;
}

// One sequence: the batch of one.
int decode_step(const StepModel& M, float* h, int64_t pos, const float* cos, const float* sin, float* logits,
                int threads, bool fast, double* kernel_s) {
  const StepModel* one = &M;
  return decode_batch(&one, 1, h, &pos, cos, sin, logits, threads, fast, kernel_s);
}

const bool HAS_FAST = cpu_has_fast();

}  // namespace

extern "C" {

// Bumped whenever the Layer struct or a signature changes: kernel.py refuses a stale build.
int sc_abi_version(void) { return 9; }

// 1 when the AVX-512 VBMI2 + VNNI path can run on this CPU.
int sc_has_fast(void) { return HAS_FAST ? 1 : 0; }

// Quantize n rows of x [n][k] to uint8 rows of `stride` bytes; scale and zero point per row.
// path as in sc_linear. Returns 0, or -1 when the fast path was asked for and cannot run.
int sc_quantize(const float* x, int64_t n, int64_t k, int64_t stride, uint8_t* q, float* scale, int32_t* zp,
                int path) {
  bool fast = path == 2 || (path == 0 && HAS_FAST);
  if (fast && !HAS_FAST) return -1;
  for (int64_t t = 0; t < n; ++t) {
    if (fast)
      quantize_row_fast(x + t * k, k, stride, q + t * stride, scale + t, zp + t);
    else
      quantize_row(x + t * k, k, stride, q + t * stride, scale + t, zp + t);
  }
  return 0;
}

// y [n][out] = the layer applied to x [n][in]. ints: null, or [n][out] for acc - zp * rowsum.
// path: 0 auto, 1 scalar, 2 fast. Returns 0, or -1 when the fast path was asked for and cannot run.
int sc_linear(const Layer* L, const float* x, int64_t n, float* y, int32_t* ints, int threads, int path) {
  bool fast = path == 2 || (path == 0 && HAS_FAST);
  if (fast && !HAS_FAST) return -1;
  return apply(*L, x, n, y, ints, threads < 1 ? 1 : threads, fast);
}

// One decode step of a Llama-family model (one token) after `pos` cached tokens: h [hidden] holds the
// token's embedding on entry; its key and value are written at `pos` of each layer's cache; logits
// [vocab] out. cos, sin: the rotary tables of position `pos` [head_dim]. kernel_s (or null) accumulates
// the seconds spent in the int8 matmuls. Returns 0, -1 (fast path asked for and absent), -2 (memory).
int sc_decode_step(const StepModel* M, float* h, int64_t pos, const float* cos, const float* sin, float* logits,
                   int threads, int path, double* kernel_s) {
  bool fast = path == 2 || (path == 0 && HAS_FAST);
  if (fast && !HAS_FAST) return -1;
  return decode_step(*M, h, pos, cos, sin, logits, threads < 1 ? 1 : threads, fast, kernel_s);
}

// sc_decode_step for B sequences in one call (decode_batch): M [B] their models (the same weights, each
// sequence's own caches), h [B][hidden], pos [B], cos and sin [B][head_dim], logits [B][vocab].
// Every row's results equal a sc_decode_step of that sequence alone, bit for bit. Returns as sc_decode_step.
int sc_decode_batch(const StepModel* const* M, int64_t B, float* h, const int64_t* pos, const float* cos,
                    const float* sin, float* logits, int threads, int path, double* kernel_s) {
  bool fast = path == 2 || (path == 0 && HAS_FAST);
  if (fast && !HAS_FAST) return -1;
  if (B < 1) return 0;
  return decode_batch(M, B, h, pos, cos, sin, logits, threads < 1 ? 1 : threads, fast, kernel_s);
}

// Read `bytes` bytes once with `threads` threads (a streaming-read bandwidth probe); returns a checksum.
uint64_t sc_stream_read(const uint8_t* p, int64_t bytes, int threads, int path) {
  if (threads < 1) threads = 1;
  ReadJob job{p, bytes, (bytes / threads) & ~int64_t(255), threads, (path == 2 || path == 0) && HAS_FAST, {0}};
  pool().run(threads, threads, &ReadJob::chunk, &job);
  return job.total.load();
}

}  // extern "C"
