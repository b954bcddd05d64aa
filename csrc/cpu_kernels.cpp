// CPU kernels of the "cpu" backend: NF4 dequantization (vectorised, threaded) and the LoRA dropout mask.
// Contracts in cpu_kernels.h; the Python side is fused_lora/cpu.py.
//
// NF4 (docs/DESIGN.md, "NF4 format"): element e of the row-major weight is code[q] · absmax[e / blocksize], with q
// the high nibble of packed byte e / 2 when e is even and the low nibble when e is odd; the product is one fp32
// multiply (never fused with anything), then one rounding to the output dtype. The AVX2 path decodes 16 elements
// (8 bytes) per step: the 16-entry code table lives in two registers and vpermps picks the entries by nibble, so
// there is no memory gather. It runs only on 16-element groups that start at e % 16 == 0, which never cross a
// block (every blocksize is a multiple of 16); the scalar path does the rest with the same arithmetic.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FUSED_LORA_X86 1
#include <immintrin.h>
#define FUSED_LORA_AVX2 __attribute__((target("avx2,f16c")))
#endif

namespace fused_lora {
namespace {

enum class Rounding { None, BFloat16, Half };

// One element's value through the optional intermediate rounding, then stored as out_t (one rounding, RNE).
template <typename out_t, Rounding R>
inline void store_scalar(out_t* dst, float value) {
  if constexpr (R == Rounding::BFloat16) value = static_cast<float>(c10::BFloat16(value));
  if constexpr (R == Rounding::Half) value = static_cast<float>(c10::Half(value));
  *dst = static_cast<out_t>(value);
}

struct NF4Args {
  const uint8_t* packed;
  const float* absmax;          // fp32 scales, or nullptr with double quantization
  const uint8_t* absmax_q;      // double quantization: 8-bit codes of absmax - offset (else nullptr)
  const float* nested_absmax;   // double quantization: one fp32 scale per nested block
  const float* nested_code;     // double quantization: the 256-entry signed dynamic map
  float offset;                 // double quantization: mean(absmax)
  int64_t nested_blocksize;
  const float* code;
  int64_t blocksize;
};

// absmax of block b; with double quantization fl(fl(nested_code[q] · nested_absmax[b / 256]) + offset), two
// roundings as bitsandbytes does (volatile keeps the compiler from fusing them into one FMA).
inline float block_scale(const NF4Args& a, int64_t b) {
  if (a.absmax_q == nullptr) return a.absmax[b];
  volatile float product = a.nested_code[a.absmax_q[b]] * a.nested_absmax[b / a.nested_blocksize];
  return product + a.offset;
}

inline int nf4_index(const NF4Args& a, int64_t e) {
  const uint8_t byte = a.packed[e >> 1];
  return (e & 1) ? (byte & 0xF) : (byte >> 4);
}

// Elements [e0, e1) into dst[0 .. e1 - e0).
template <typename out_t, Rounding R>
void dequantize_range_scalar(const NF4Args& a, int64_t e0, int64_t e1, out_t* dst) {
  int64_t e = e0;
  while (e < e1) {
    const int64_t block = e / a.blocksize;
    const int64_t block_end = std::min(e1, (block + 1) * a.blocksize);
    const float scale = block_scale(a, block);
    for (; e < block_end; ++e) store_scalar<out_t, R>(dst + (e - e0), a.code[nf4_index(a, e)] * scale);
  }
}

#ifdef FUSED_LORA_X86

// bf16 bits (in the low 16 bits of each 32-bit lane) of 8 floats: round to nearest even, NaN -> 0x7FC0, exactly
// c10::BFloat16(float).
FUSED_LORA_AVX2 inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(is_nan));
}

template <Rounding R>
FUSED_LORA_AVX2 inline __m256 round_through(__m256 v) {
  if constexpr (R == Rounding::BFloat16) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16));
  if constexpr (R == Rounding::Half) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  return v;
}

// Store 16 consecutive values (lo: elements 0-7, hi: 8-15).
template <typename out_t, Rounding R>
FUSED_LORA_AVX2 inline void store16(out_t* dst, __m256 lo, __m256 hi) {
  lo = round_through<R>(lo);
  hi = round_through<R>(hi);
  if constexpr (std::is_same_v<out_t, float>) {
    _mm256_storeu_ps(dst, lo);
    _mm256_storeu_ps(dst + 8, hi);
  } else if constexpr (std::is_same_v<out_t, double>) {
    _mm256_storeu_pd(dst, _mm256_cvtps_pd(_mm256_castps256_ps128(lo)));
    _mm256_storeu_pd(dst + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)));
    _mm256_storeu_pd(dst + 8, _mm256_cvtps_pd(_mm256_castps256_ps128(hi)));
    _mm256_storeu_pd(dst + 12, _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1)));
  } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    // packus interleaves the 128-bit lanes: [lo0-3, hi0-3, lo4-7, hi4-7]; permute4x64 puts them back in order
    const __m256i packed = _mm256_packus_epi32(bf16_bits(lo), bf16_bits(hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(packed, 0xD8));
  } else {
    static_assert(std::is_same_v<out_t, c10::Half>, "unsupported output type");
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
  }
}

// code[q] for 8 indices q in 0..15: vpermps reads the low 3 bits of q, bit 3 (moved to the sign bit) picks the
// upper half of the table.
FUSED_LORA_AVX2 inline __m256 lookup(__m256 code_lo, __m256 code_hi, __m256i q) {
  const __m256 from_lo = _mm256_permutevar8x32_ps(code_lo, q);
  const __m256 from_hi = _mm256_permutevar8x32_ps(code_hi, q);
  return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}

template <typename out_t, Rounding R>
FUSED_LORA_AVX2 void dequantize_range_avx2(const NF4Args& a, int64_t e0, int64_t e1, out_t* dst) {
  int64_t e = std::min(e1, (e0 + 15) & ~int64_t{15});
  dequantize_range_scalar<out_t, R>(a, e0, e, dst);
  const __m256 code_lo = _mm256_loadu_ps(a.code);      // code[0..7]
  const __m256 code_hi = _mm256_loadu_ps(a.code + 8);  // code[8..15]
  const __m256i low_nibble = _mm256_set1_epi32(0xF);
  while (e + 16 <= e1) {
    const int64_t block = e / a.blocksize;
    const int64_t block_end = std::min(e1, (block + 1) * a.blocksize);
    const __m256 scale = _mm256_set1_ps(block_scale(a, block));
    for (; e + 16 <= block_end; e += 16) {
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.packed + e / 2)));
      // even: elements 0, 2, .., 14 (high nibbles); odd: elements 1, 3, .., 15 (low nibbles)
      const __m256 even = _mm256_mul_ps(lookup(code_lo, code_hi, _mm256_srli_epi32(bytes, 4)), scale);
      const __m256 odd = _mm256_mul_ps(lookup(code_lo, code_hi, _mm256_and_si256(bytes, low_nibble)), scale);
      const __m256 t0 = _mm256_unpacklo_ps(even, odd);  // e0 e1 e2 e3 | e8 e9 e10 e11
      const __m256 t1 = _mm256_unpackhi_ps(even, odd);  // e4 e5 e6 e7 | e12 e13 e14 e15
      store16<out_t, R>(dst + (e - e0), _mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
    }
  }
  dequantize_range_scalar<out_t, R>(a, e, e1, dst + (e - e0));
}

bool detect_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

#else

bool detect_avx2() { return false; }

#endif

const bool kHasAvx2 = detect_avx2();
// Whether the AVX2 paths run (on CPUs that have AVX2); tests switch them off to check the portable paths.
std::atomic<bool> g_use_avx2{kHasAvx2};

template <typename out_t, Rounding R>
void dequantize_range(const NF4Args& a, int64_t e0, int64_t e1, out_t* dst) {
#ifdef FUSED_LORA_X86
  if (g_use_avx2.load(std::memory_order_relaxed) && a.blocksize % 16 == 0)
    return dequantize_range_avx2<out_t, R>(a, e0, e1, dst);
#endif
  dequantize_range_scalar<out_t, R>(a, e0, e1, dst);
}

constexpr int64_t kGrainElements = 1 << 15;

template <typename out_t, Rounding R>
void dequantize_into(const NF4Args& a, int64_t rows, int64_t cols, int64_t row_stride, out_t* out) {
  if (row_stride == cols || rows == 1) {  // one flat range, split into 16-aligned pieces
    const int64_t n = rows * cols;
    const int64_t groups = (n + 15) / 16;
    at::parallel_for(0, groups, kGrainElements / 16, [&](int64_t g0, int64_t g1) {
      const int64_t e0 = g0 * 16, e1 = std::min(n, g1 * 16);
      dequantize_range<out_t, R>(a, e0, e1, out + e0);
    });
    return;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r)
                       dequantize_range<out_t, R>(a, r * cols, (r + 1) * cols, out + r * row_stride);
                   });
}

template <typename out_t>
void dequantize_dispatch_rounding(const NF4Args& a, int64_t rows, int64_t cols, int64_t row_stride, out_t* out,
                                  Rounding rounding) {
  switch (rounding) {
    case Rounding::None: return dequantize_into<out_t, Rounding::None>(a, rows, cols, row_stride, out);
    case Rounding::BFloat16: return dequantize_into<out_t, Rounding::BFloat16>(a, rows, cols, row_stride, out);
    case Rounding::Half: return dequantize_into<out_t, Rounding::Half>(a, rows, cols, row_stride, out);
  }
}

Rounding parse_rounding(const std::string& name) {
  if (name.empty()) return Rounding::None;
  if (name == "bfloat16") return Rounding::BFloat16;
  if (name == "float16") return Rounding::Half;
  TORCH_CHECK(false, "fused_lora._C.nf4_dequantize_into: round_to must be '', 'bfloat16' or 'float16', got '", name,
              "'");
}

// 32-bit keep threshold: rand = k · 2^-24 (k < 2^24) is kept iff rand >= fl32(p), i.e. k >= ceil(fl32(p) · 2^24)
// (exact in double: fl32(p) has 24 significant bits).
uint32_t keep_threshold(double p) {
  const double p32 = static_cast<double>(static_cast<float>(p));
  return static_cast<uint32_t>(std::ceil(p32 * 16777216.0));
}

// The standard 32-bit Mersenne Twister (std::mt19937, torch's CPU generator), producing its outputs a block of 624
// at a time: twist the whole state, then temper it. The twist's reads reach 1 and 397 words ahead (old words) and
// 227 behind (new words), never inside an 8-word step, so the AVX2 path twists 8 words per instruction.
constexpr int kMTWords = 624, kMTShift = 397;
constexpr uint32_t kMTMatrix = 0x9908B0DFu, kMTUpper = 0x80000000u, kMTLower = 0x7FFFFFFFu;

inline uint32_t mt_twist_word(uint32_t current, uint32_t next, uint32_t far) {
  const uint32_t y = (current & kMTUpper) | (next & kMTLower);
  return far ^ (y >> 1) ^ ((0u - (y & 1u)) & kMTMatrix);
}

inline uint32_t mt_temper(uint32_t y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9D2C5680u;
  y ^= (y << 15) & 0xEFC60000u;
  return y ^ (y >> 18);
}

void mt_seed(uint32_t* mt, uint32_t seed) {
  mt[0] = seed;
  for (int i = 1; i < kMTWords; ++i) mt[i] = 1812433253u * (mt[i - 1] ^ (mt[i - 1] >> 30)) + static_cast<uint32_t>(i);
}

// Twist the state from word `from` on (scalar): the reference the vector path must match.
void mt_twist_scalar_from(uint32_t* mt, int from) {
  for (int i = from; i < kMTWords - kMTShift; ++i) mt[i] = mt_twist_word(mt[i], mt[i + 1], mt[i + kMTShift]);
  for (int i = std::max(from, kMTWords - kMTShift); i < kMTWords - 1; ++i)
    mt[i] = mt_twist_word(mt[i], mt[i + 1], mt[i + kMTShift - kMTWords]);
  mt[kMTWords - 1] = mt_twist_word(mt[kMTWords - 1], mt[0], mt[kMTShift - 1]);
}

// keep[j] = (tempered word j & 0xFFFFFF) >= threshold for the `count` first words of the (twisted) state.
void mt_keep_scalar(const uint32_t* mt, int count, uint32_t threshold, uint8_t* keep) {
  for (int j = 0; j < count; ++j) keep[j] = (mt_temper(mt[j]) & 0xFFFFFFu) >= threshold;
}

#ifdef FUSED_LORA_X86

FUSED_LORA_AVX2 inline void mt_twist8(uint32_t* mt, int i, const uint32_t* far) {
  const __m256i current = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mt + i));
  const __m256i next = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mt + i + 1));
  const __m256i far_words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(far));
  const __m256i y = _mm256_or_si256(_mm256_and_si256(current, _mm256_set1_epi32(static_cast<int>(kMTUpper))),
                                    _mm256_and_si256(next, _mm256_set1_epi32(kMTLower)));
  const __m256i odd = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_and_si256(y, _mm256_set1_epi32(1)));
  const __m256i mag = _mm256_and_si256(odd, _mm256_set1_epi32(static_cast<int>(kMTMatrix)));
  const __m256i twisted = _mm256_xor_si256(_mm256_xor_si256(far_words, _mm256_srli_epi32(y, 1)), mag);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(mt + i), twisted);
}

FUSED_LORA_AVX2 void mt_twist_avx2(uint32_t* mt) {
  int i = 0;
  for (; i + 8 <= kMTWords - kMTShift; i += 8) mt_twist8(mt, i, mt + i + kMTShift);
  for (; i < kMTWords - kMTShift; ++i) mt[i] = mt_twist_word(mt[i], mt[i + 1], mt[i + kMTShift]);
  for (; i + 8 <= kMTWords - 1; i += 8) mt_twist8(mt, i, mt + i + kMTShift - kMTWords);
  mt_twist_scalar_from(mt, i);
}

FUSED_LORA_AVX2 void mt_keep_avx2(const uint32_t* mt, int count, uint32_t threshold, uint8_t* keep) {
  const __m256i low24 = _mm256_set1_epi32(0xFFFFFF);
  const __m256i below = _mm256_set1_epi32(static_cast<int>(threshold) - 1);  // k >= threshold <=> k > threshold-1
  const __m256i temper_b = _mm256_set1_epi32(static_cast<int>(0x9D2C5680u));
  const __m256i temper_c = _mm256_set1_epi32(static_cast<int>(0xEFC60000u));
  int j = 0;
  for (; j + 32 <= count; j += 32) {
    __m256i kept[4];
    for (int q = 0; q < 4; ++q) {
      __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mt + j + 8 * q));
      y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
      y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), temper_b));
      y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), temper_c));
      y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
      kept[q] = _mm256_cmpgt_epi32(_mm256_and_si256(y, low24), below);  // 0 or -1 per word
    }
    // 4 × 8 words of 0/-1 -> 32 bytes of 0/1 in order (the packs interleave 128-bit lanes; the permute undoes it)
    const __m256i words16 =
        _mm256_packs_epi16(_mm256_packs_epi32(kept[0], kept[1]), _mm256_packs_epi32(kept[2], kept[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(words16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + j), _mm256_and_si256(ordered, _mm256_set1_epi8(1)));
  }
  mt_keep_scalar(mt + j, count - j, threshold, keep + j);
}

#endif

void check_mask(const char* who, const torch::Tensor& keep, int64_t rows, int64_t cols) {
  TORCH_CHECK(keep.scalar_type() == at::kByte && keep.is_contiguous() && keep.dim() == 2 && keep.size(0) == rows &&
                  keep.size(1) == cols,
              "fused_lora._C.", who, ": keep must be a contiguous uint8 tensor of shape (", rows, ", ", cols, ")");
}

void check_cpu(const char* who, const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fused_lora._C.", who, ": ", name, " must be a CPU tensor, got ", t.device());
}

}  // namespace

bool cpu_has_avx2() { return kHasAvx2; }

bool cpu_use_avx2(bool enable) { return g_use_avx2.exchange(enable && kHasAvx2); }

void nf4_dequantize_into(torch::Tensor out, const torch::Tensor& packed, const torch::Tensor& absmax,
                         const torch::Tensor& code, int64_t blocksize, const std::string& round_to,
                         const c10::optional<torch::Tensor>& nested_absmax,
                         const c10::optional<torch::Tensor>& nested_code, double offset, int64_t nested_blocksize) {
  const char* who = "nf4_dequantize_into";
  check_cpu(who, out, "out");
  check_cpu(who, packed, "packed");
  check_cpu(who, absmax, "absmax");
  check_cpu(who, code, "code");
  TORCH_CHECK(out.dim() == 2 && (out.stride(1) == 1 || out.size(1) <= 1) && out.stride(0) >= out.size(1),
              "fused_lora._C.nf4_dequantize_into: out must be 2-D with unit column stride and row stride >= columns");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "fused_lora._C.nf4_dequantize_into: packed must be contiguous uint8");
  const bool double_quant = nested_absmax.has_value();
  TORCH_CHECK(double_quant == nested_code.has_value(),
              "fused_lora._C.nf4_dequantize_into: nested_absmax and nested_code go together");
  TORCH_CHECK(absmax.scalar_type() == (double_quant ? at::kByte : at::kFloat) && absmax.is_contiguous(),
              "fused_lora._C.nf4_dequantize_into: absmax must be contiguous ",
              double_quant ? "uint8 (double quantization)" : "float32");
  if (double_quant) {
    check_cpu(who, *nested_absmax, "nested_absmax");
    check_cpu(who, *nested_code, "nested_code");
    TORCH_CHECK(nested_blocksize > 0, "fused_lora._C.nf4_dequantize_into: nested_blocksize must be positive");
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_absmax->is_contiguous() &&
                    nested_absmax->numel() >= (absmax.numel() + nested_blocksize - 1) / nested_blocksize,
                "fused_lora._C.nf4_dequantize_into: nested_absmax must be contiguous float32, one per nested block");
    TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->is_contiguous() && nested_code->numel() == 256,
                "fused_lora._C.nf4_dequantize_into: nested_code must be contiguous float32 [256]");
  }
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16,
              "fused_lora._C.nf4_dequantize_into: code must be contiguous float32 [16]");
  TORCH_CHECK(blocksize > 0, "fused_lora._C.nf4_dequantize_into: blocksize must be positive");
  const int64_t rows = out.size(0), cols = out.size(1), n = rows * cols;
  TORCH_CHECK(packed.numel() >= (n + 1) / 2, "fused_lora._C.nf4_dequantize_into: packed holds ", packed.numel(),
              " bytes, ", (n + 1) / 2, " needed for ", n, " elements");
  TORCH_CHECK(absmax.numel() >= (n + blocksize - 1) / blocksize, "fused_lora._C.nf4_dequantize_into: absmax holds ",
              absmax.numel(), " scales, ", (n + blocksize - 1) / blocksize, " needed");
  if (n == 0) return;
  NF4Args args{packed.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, nullptr, 0.0f, 1, code.data_ptr<float>(),
               blocksize};
  if (double_quant) {
    args.absmax_q = absmax.data_ptr<uint8_t>();
    args.nested_absmax = nested_absmax->data_ptr<float>();
    args.nested_code = nested_code->data_ptr<float>();
    args.offset = static_cast<float>(offset);
    args.nested_blocksize = nested_blocksize;
  } else {
    args.absmax = absmax.data_ptr<float>();
  }
  const Rounding rounding = parse_rounding(round_to);
  const int64_t ld = rows == 1 ? cols : out.stride(0);
  switch (out.scalar_type()) {
    case at::kFloat: return dequantize_dispatch_rounding(args, rows, cols, ld, out.data_ptr<float>(), rounding);
    case at::kDouble: return dequantize_dispatch_rounding(args, rows, cols, ld, out.data_ptr<double>(), rounding);
    case at::kBFloat16:
      return dequantize_dispatch_rounding(args, rows, cols, ld, out.data_ptr<c10::BFloat16>(), rounding);
    case at::kHalf: return dequantize_dispatch_rounding(args, rows, cols, ld, out.data_ptr<c10::Half>(), rounding);
    default: TORCH_CHECK(false, "fused_lora._C.nf4_dequantize_into: unsupported output dtype ", out.scalar_type());
  }
}

torch::Tensor dropout_keep(int64_t rows, int64_t cols, int64_t seed, double p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "fused_lora._C.dropout_keep: negative shape");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fused_lora._C.dropout_keep: p must be in [0, 1), got ", p);
  auto keep = torch::empty({rows, cols}, torch::kUInt8);
  uint8_t* out = keep.data_ptr<uint8_t>();
  // torch.Generator().manual_seed(seed) on the CPU is mt19937 seeded with the low 32 bits of seed; torch.rand
  // turns each 32-bit draw r into (r & 0xFFFFFF) · 2^-24 (at::uniform_real_distribution<float>), in row-major order.
  uint32_t mt[kMTWords];
  mt_seed(mt, static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu));
  const uint32_t threshold = keep_threshold(p);
  const int64_t n = rows * cols;
  const bool use_avx2 = g_use_avx2.load(std::memory_order_relaxed);
  for (int64_t start = 0; start < n; start += kMTWords) {
    const int count = static_cast<int>(std::min<int64_t>(kMTWords, n - start));
#ifdef FUSED_LORA_X86
    if (use_avx2) {
      mt_twist_avx2(mt);
      mt_keep_avx2(mt, count, threshold, out + start);
      continue;
    }
#endif
    mt_twist_scalar_from(mt, 0);
    mt_keep_scalar(mt, count, threshold, out + start);
  }
  return keep;
}

namespace {

// out[r, c] = (alpha · src[r, c]) · m[r, c] for rows [r0, r1); contiguous columns, so the compiler vectorises it.
template <typename src_t, typename out_t, typename acc_t>
void dropout_apply_rows(const src_t* src, int64_t src_stride, const uint8_t* keep, out_t* out, int64_t out_stride,
                        int64_t r0, int64_t r1, int64_t cols, acc_t alpha, acc_t keep_value) {
  for (int64_t r = r0; r < r1; ++r) {
    const src_t* s = src + r * src_stride;
    const uint8_t* k = keep + r * cols;
    out_t* o = out + r * out_stride;
    for (int64_t c = 0; c < cols; ++c) {
      const acc_t m = static_cast<acc_t>(k[c]) * keep_value;  // 0 or keep_value, exactly
      o[c] = static_cast<out_t>((alpha * static_cast<acc_t>(s[c])) * m);
    }
  }
}

}  // namespace

torch::Tensor dropout_apply_into(torch::Tensor out, const torch::Tensor& src, const torch::Tensor& keep, double scale,
                                 double alpha) {
  const char* who = "dropout_apply_into";
  check_cpu(who, src, "src");
  check_cpu(who, out, "out");
  TORCH_CHECK(src.dim() == 2 && out.sizes() == src.sizes(),
              "fused_lora._C.dropout_apply_into: out and src must be 2-D tensors of one shape");
  TORCH_CHECK((src.stride(1) == 1 || src.size(1) <= 1) && (out.stride(1) == 1 || out.size(1) <= 1),
              "fused_lora._C.dropout_apply_into: out and src need unit column strides");
  const int64_t rows = src.size(0), cols = src.size(1);
  TORCH_CHECK(rows <= 1 || out.stride(0) >= cols,
              "fused_lora._C.dropout_apply_into: out's rows overlap (row stride ", out.stride(0), " < ", cols,
              " columns)");
  check_mask(who, keep, rows, cols);
  if (rows == 0 || cols == 0) return out;
  const uint8_t* k = keep.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "dropout_apply_into_src", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dropout_apply_into_out", [&] {
      using out_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<src_t, double> || std::is_same_v<out_t, double>, double, float>;
      // the reference's mask is float32 (0 or fl32(1 / (1 - p))), widened to the arithmetic type
      const acc_t keep_value = static_cast<acc_t>(static_cast<float>(scale));
      const src_t* in = src.const_data_ptr<src_t>();
      out_t* o = out.data_ptr<out_t>();
      const int64_t src_stride = src.stride(0), out_stride = out.stride(0);
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)),
                       [&](int64_t r0, int64_t r1) {
                         dropout_apply_rows<src_t, out_t, acc_t>(in, src_stride, k, o, out_stride, r0, r1, cols,
                                                                 static_cast<acc_t>(alpha), keep_value);
                       });
    });
  });
  return out;
}

}  // namespace fused_lora
