// Atelier's native kernels: what a decoding step does for every token, each one call from Python that holds
// no GIL while it runs.
//
//   gpt2_step     tokens through a GPT-2 block stack (chargpt.Decoder, and hf_decoders.Gpt2Decoder for an
//                 imported GPT-2): one new token per row, or whole prompts; fp32 weights, or a quantized
//                 version's int8 matrices (atelier/models/int8.py) read as they are stored
//   llama_step    the same for the Llama family (Llama, Qwen2, Mistral: RMSNorm, rotary positions,
//                 grouped-query attention, SiLU-gated MLP; hf_decoders.LlamaDecoder)
//   sample_plain  the inverse-CDF draw of atelier/runtime/sampling.py for rows that ask for nothing but a
//                 temperature, fused into three passes over each row (the same tokens, but for a draw within
//                 a float's rounding of a boundary between two); draw_next has a step draw them itself
//
// Why C++: at batch 1 a tang-poet step reads 16 MB of weights in about 0.6 ms, and the hundred or so tensor
// operations around those reads cost as much again when each crosses from Python (and takes the GIL back
// from the event loop). Here the matrix products are MKL's sgemm, called directly, and the glue (embedding,
// norms, biases, residuals, rotary positions, attention in place over the KV cache) is plain loops.
// A step of many rows splits them between a few threads (Team), one hand-over a step.
// A step also writes the wake-up bytes the text engine armed (arm_wake) once it has let go of the GIL, so
// that the event loops stream the last step's tokens while this one computes.
// Built on the machine that runs it by `make` (python -m atelier.common.native), with -march=native.

#include <torch/extension.h>

#include <immintrin.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace py = pybind11;
using at::Tensor;

// MKL's single-precision GEMM, exported by libtorch_cpu (the one ATen's addmm runs on).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Descriptors (eventfds, or pipes) to write a wake-up to once the next step has let go of the GIL (arm_wake):
// the text engine's event loops, woken to stream the last step's tokens while this one computes.
thread_local std::vector<int> armed;

void wake_armed() {
  const uint64_t one = 1;  // an eventfd's counter takes 8 bytes; a pipe reads them as any others
  for (int fd : armed) [[maybe_unused]] auto written = ::write(fd, &one, sizeof one);  // a full pipe is awake
  armed.clear();
}

// What sample_plain takes for each row of a step's logits. Given to draw_next, the next gpt2_step or
// llama_step on this thread draws its rows' tokens itself, in the same call without the GIL (one hand-over
// of the GIL a step instead of two: each is a wait while an event loop holds it), each part of a split step
// its own rows' (16 and 32 rows on two threads: 5-9 % less time a step than drawing them after), and drawn()
// returns them.
struct Draws {
  std::vector<std::vector<int64_t>> banned;
  std::vector<double> temps;
  std::vector<at::Generator> generators;

  // One entry of each per row of `logits` (B, vocab), and banned ids within the vocabulary.
  void check(const Tensor& logits, const char* who) const {
    const int64_t B = logits.size(0), vocab = logits.size(1);
    TORCH_CHECK(static_cast<int64_t>(banned.size()) == B && static_cast<int64_t>(temps.size()) == B &&
                    static_cast<int64_t>(generators.size()) == B,
                who, ": one banned list, temperature and generator per row of the logits");
    TORCH_CHECK(vocab > 0, "logits: at least one token");
    for (const auto& ids : banned)
      for (int64_t id : ids) TORCH_CHECK(id >= 0 && id < vocab, "banned id ", id, " out of range");
  }
};
thread_local std::optional<Draws> next_draws;
thread_local std::optional<std::vector<int64_t>> last_drawn;

int64_t draw_row(float* row, int64_t vocab, const Draws& d, int64_t i, std::vector<float>& blocks);

// A step's draws: those draw_next left for it (taken, and checked against its logits, while the GIL is held),
// each part of the step drawing its own rows' tokens once it has their logits, kept for drawn() at the end.
class StepDraws {
 public:
  explicit StepDraws(const Tensor& logits) : data_(logits.data_ptr<float>()), vocab_(logits.size(1)) {
    draws_.swap(next_draws);
    last_drawn.reset();
    if (draws_.has_value()) {
      draws_->check(logits, "draw_next");
      tokens_.resize(logits.size(0));
    }
  }

  // Rows first…end−1, from any thread (the parts' rows do not overlap).
  void draw(int64_t first, int64_t end) {
    if (!draws_.has_value()) return;
    std::vector<float> blocks;
    for (int64_t m = first; m < end; ++m) tokens_[m] = draw_row(data_ + m * vocab_, vocab_, *draws_, m, blocks);
  }

  void keep() {
    if (draws_.has_value()) last_drawn = std::move(tokens_);
  }

 private:
  float* data_;
  int64_t vocab_;
  std::optional<Draws> draws_;
  std::vector<int64_t> tokens_;
};

void check_float(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), what,
              " must be a contiguous float32 CPU tensor");
}

// A weight matrix as the decoders keep it: (in, out), which sgemm reads fastest, or (out, in), an
// nn.Linear's own (a language model's head, tied to the embedding). Either may be int8 with one float
// scale per stored row (atelier/models/int8.py: w ≈ q · s): per input for (in, out), per output for
// (out, in). An int8 matrix is a quarter of the bytes to read, and reading is what a step of few rows
// waits for; its products are the loops below instead of MKL's.
struct Matrix {
  const float* data = nullptr;
  const int8_t* q = nullptr;
  const float* scale = nullptr;
  int64_t in, out;
  bool out_in;

  Matrix(const Tensor& w, bool out_in_layout, const std::optional<Tensor>& scales = std::nullopt)
      : out_in(out_in_layout) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "a weight must be a contiguous matrix");
    in = out_in ? w.size(1) : w.size(0);
    out = out_in ? w.size(0) : w.size(1);
    if (scales.has_value()) {
      TORCH_CHECK(w.scalar_type() == at::kChar, "a weight with scales must be int8");
      check_float(*scales, "scales");
      TORCH_CHECK(scales->numel() == w.size(0), "one scale per stored row");
      q = w.data_ptr<int8_t>();
      scale = scales->data_ptr<float>();
    } else {
      check_float(w, "a weight");
      data = w.data_ptr<float>();
    }
  }

  // Row r of the stored matrix, as floats (an embedding lookup).
  void row(int64_t r, float* dst) const {
    const int64_t width = out_in ? in : out;
    if (q == nullptr) {
      std::memcpy(dst, data + r * width, width * sizeof(float));
      return;
    }
    const int8_t* src = q + r * width;
    for (int64_t c = 0; c < width; ++c) dst[c] = src[c] * scale[r];
  }
};

const float* data_or_null(const std::optional<Tensor>& t) {
  if (!t.has_value()) return nullptr;
  check_float(*t, "a bias");
  return t->data_ptr<float>();
}

// int8 products with GCC's vector types: 16 floats to a register, the int8 weights widened as they are
// loaded, sums kept in registers. (Plain loops left the sums in memory: no faster than fp32.)
typedef float f16 __attribute__((vector_size(64)));
typedef int8_t i16 __attribute__((vector_size(16)));

inline f16 widen(const int8_t* q) {
#if defined(__AVX512F__)
  // vpmovsxbd + vcvtdq2ps: g++ 12 turns __builtin_convertvector of int8 lanes into scalar shifts
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  f16 out;
  std::memcpy(&out, &v, sizeof out);
  return out;
#else
  f16 out;
  for (int j = 0; j < 16; ++j) out[j] = q[j];
  return out;
#endif
}

inline float total(f16 v) {
  float sum = 0.f;
  for (int j = 0; j < 16; ++j) sum += v[j];
  return sum;
}

// Rows × 64 outputs of an int8 (in, out) product, columns n0…n0+63: y[r][n] (+)= Σ_k xs[r][k] · q[k][n], where
// xs is x already multiplied by the per-input scales.
template <int Rows>
void q8_block(const float* xs, int64_t K, const int8_t* q, int64_t N, int64_t n0, float* y, bool add) {
  f16 acc[Rows][4] = {};
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* wk = q + k * N + n0;
    const f16 w0 = widen(wk), w1 = widen(wk + 16), w2 = widen(wk + 32), w3 = widen(wk + 48);
    for (int r = 0; r < Rows; ++r) {
      const float xk = xs[r * K + k];
      acc[r][0] += xk * w0;
      acc[r][1] += xk * w1;
      acc[r][2] += xk * w2;
      acc[r][3] += xk * w3;
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < 4; ++c) {
      float* out = y + r * N + n0 + 16 * c;
      for (int j = 0; j < 16; ++j) out[j] = (add ? out[j] : 0.f) + acc[r][c][j];
    }
}

// y (N, out) = x (N, in) · w + bias, added to what y holds when `accumulate` (a residual).
void linear(const float* x, const Matrix& w, const float* bias, float* y, int64_t N, bool accumulate) {
  const int64_t out = w.out;
  if (bias != nullptr) {
    for (int64_t i = 0; i < N; ++i) {
      float* row = y + i * out;
      if (accumulate) {
        for (int64_t n = 0; n < out; ++n) row[n] += bias[n];
      } else {
        std::memcpy(row, bias, out * sizeof(float));
      }
    }
  }
  const bool add = accumulate || bias != nullptr;
  if (w.q != nullptr && !w.out_in) {  // int8 (in, out): scale the inputs, then sum int8 rows
    const int64_t K = w.in;
    std::vector<float> xs(N * K);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < K; ++k) xs[i * K + k] = x[i * K + k] * w.scale[k];
    const int64_t blocked = out - out % 64;
    for (int64_t n0 = 0; n0 < blocked; n0 += 64) {
      int64_t i = 0;
      for (; i + 4 <= N; i += 4) q8_block<4>(&xs[i * K], K, w.q, out, n0, y + i * out, add);
      for (; i < N; ++i) q8_block<1>(&xs[i * K], K, w.q, out, n0, y + i * out, add);
    }
    for (int64_t i = 0; i < N; ++i)  // the last columns, fewer than 64
      for (int64_t n = blocked; n < out; ++n) {
        float sum = 0.f;
        for (int64_t k = 0; k < K; ++k) sum += xs[i * K + k] * w.q[k * out + n];
        y[i * out + n] = (add ? y[i * out + n] : 0.f) + sum;
      }
    return;
  }
  if (w.q != nullptr) {  // int8 (out, in): one dot product per output, scaled by its row's scale
    const int64_t K = w.in, vectors = K / 16;
    for (int64_t n = 0; n < out; ++n) {
      const int8_t* wn = w.q + n * K;
      for (int64_t i = 0; i < N; ++i) {
        const float* xi = x + i * K;
        f16 acc = {};
        for (int64_t v = 0; v < vectors; ++v) {
          f16 xv;
          std::memcpy(&xv, xi + 16 * v, sizeof xv);
          acc += xv * widen(wn + 16 * v);
        }
        float sum = total(acc);
        for (int64_t k = 16 * vectors; k < K; ++k) sum += xi[k] * wn[k];
        y[i * out + n] = (add ? y[i * out + n] : 0.f) + sum * w.scale[n];
      }
    }
    return;
  }
  // Column-major BLAS sees a row-major (in, out) matrix as its transpose: yᵀ = wᵀ · xᵀ; an (out, in) one
  // is read transposed.
  const char trans = w.out_in ? 'T' : 'N', no = 'N';
  const int m = static_cast<int>(out), n = static_cast<int>(N), k = static_cast<int>(w.in);
  const int lda = w.out_in ? k : m;
  const float one = 1.f, beta = add ? 1.f : 0.f;
  sgemm_(&trans, &no, &m, &n, &k, &one, w.data, &lda, x, &k, &beta, y, &m);
}

// LayerNorm over rows of C, as torch.layer_norm: biased variance, eps inside the root.
void layer_norm(const float* x, float* y, const float* weight, const float* bias, int64_t N, int64_t C, float eps) {
  for (int64_t i = 0; i < N; ++i) {
    const float* row = x + i * C;
    float* o = y + i * C;
    float sum = 0.f;
    for (int64_t c = 0; c < C; ++c) sum += row[c];
    const float mean = sum / C;
    float sq = 0.f;
    for (int64_t c = 0; c < C; ++c) sq += (row[c] - mean) * (row[c] - mean);
    const float inv = 1.f / std::sqrt(sq / C + eps);
    for (int64_t c = 0; c < C; ++c) o[c] = (row[c] - mean) * inv * weight[c] + bias[c];
  }
}

// RMSNorm over rows of C, as torch.rms_norm: x / sqrt(mean(x²) + eps) · weight.
void rms_norm(const float* x, float* y, const float* weight, int64_t N, int64_t C, float eps) {
  for (int64_t i = 0; i < N; ++i) {
    const float* row = x + i * C;
    float* o = y + i * C;
    float sq = 0.f;
    for (int64_t c = 0; c < C; ++c) sq += row[c] * row[c];
    const float inv = 1.f / std::sqrt(sq / C + eps);
    for (int64_t c = 0; c < C; ++c) o[c] = row[c] * inv * weight[c];
  }
}

// One layer's KV cache: keys and values (slots, kv_heads, capacity, head_dim), each contiguous, float32 or
// float16 (ATELIER_KV_CACHE_DTYPE: half the bytes that attention reads; written rounded to nearest, as torch's
// .to(float16), and read back exactly, so the module path over a float16 cache computes the same).
struct LayerCache {
  void* keys;
  void* values;
  bool half;
  int64_t slots, kv_heads, capacity, head_dim;

  LayerCache(Tensor& k, Tensor& v) {
    TORCH_CHECK((k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf) &&
                    v.scalar_type() == k.scalar_type() && k.is_contiguous() && v.is_contiguous() &&
                    k.device().is_cpu() && v.device().is_cpu(),
                "cached keys and values must be contiguous float32 or float16 CPU tensors, both the same");
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), "keys and values: (slots, kv_heads, capacity, head_dim)");
    keys = k.data_ptr();
    values = v.data_ptr();
    half = k.scalar_type() == at::kHalf;
    slots = k.size(0), kv_heads = k.size(1), capacity = k.size(2), head_dim = k.size(3);
  }

  int64_t offset(int64_t slot, int64_t head, int64_t position) const {
    return ((slot * kv_heads + head) * capacity + position) * head_dim;
  }

  template <typename T>
  T* at_keys(int64_t at) const { return static_cast<T*>(keys) + at; }
  template <typename T>
  T* at_values(int64_t at) const { return static_cast<T*>(values) + at; }
};

// n floats into the cache's storage: copied, or rounded to float16 (to nearest, ties to even, as torch).
inline void store(float* to, const float* from, int64_t n) { std::memcpy(to, from, n * sizeof(float)); }
inline void store(at::Half* to, const float* from, int64_t n) {
  for (int64_t d = 0; d < n; ++d) to[d] = at::Half(from[d]);
}

// Asks for the cache lines of p[0…n-1] ahead of their reads, into L1 (Locality 3) or L2 (2). A head's cached keys
// and values are a few KB at a place of their own in a cache larger than the processor's, so each head's
// streams start cold unless asked for while the head before it computes.
template <int Locality, typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b, 0, Locality);
}

// One query head over `length` cached positions: softmax(q · kⱼ · scale) weighting the vⱼ, into out.
template <typename T>
void attend_head(const float* qh, const T* keys, const T* values, int64_t length, int64_t hd, float scale,
                 float* weights, float* out) {
  float top = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    const T* kj = keys + j * hd;
    float s = 0.f;
    for (int64_t d = 0; d < hd; ++d) s += qh[d] * static_cast<float>(kj[d]);
    weights[j] = s * scale;
    top = (j == 0 || weights[j] > top) ? weights[j] : top;
  }
  float total = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    weights[j] = std::exp(weights[j] - top);
    total += weights[j];
  }
  std::fill(out, out + hd, 0.f);
  for (int64_t j = 0; j < length; ++j) {
    const T* vj = values + j * hd;
    const float w = weights[j] / total;
    for (int64_t d = 0; d < hd; ++d) out[d] += w * static_cast<float>(vj[d]);
  }
}

#if defined(__AVX512F__)
// The lanes of a run of 16 that hold one of the `left` values still to go (all 16 once 16 or more are left).
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
}

// e^x for 16 lanes, x ≤ 0 here (scores less their maximum): x = n·ln2 + r, |r| ≤ ln2/2, e^r by its degree-6
// Taylor polynomial (error below float's rounding there), scaled by 2ⁿ with scalef, which gives 0 once
// 2ⁿ is past float's range rather than wrapping around.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: n·hi is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// w[j] ← e^(w[j] - top) for j < n, 16 at a time; their sum.
inline float exponentiate(float* w, int64_t n, __m512 top) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = lanes(n - j);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, w + j), top)));
    _mm512_mask_storeu_ps(w + j, live, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// 16 cached floats from either storage: float16 widens exactly (vcvtph2ps).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Sixteen dot products' sums at once: lane p of the result is the sum of the lanes of a[slot16(p)], where
// slot16(p) = 4·(p % 4) + p / 4 (the shuffles' tree below ends in that 4×4 transposition, so the caller files
// its vectors by slot and gets its sums in order). Four levels of shuffles and adds: 15 adds for 16 sums,
// where one _mm512_reduce_add_ps each cost 4 adds and 4 shuffles with a chain of latency behind them.
inline int slot16(int p) { return 4 * (p % 4) + p / 4; }

inline __m512 sum16(const __m512* a) {
  __m512 t[8], u[4], w[2];
  for (int k = 0; k < 8; ++k)  // 128-bit chunks: [a0+a2, a1+a3 | b0+b2, b1+b3]
    t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)  // one 128-bit chunk per vector of a: 4 partial sums each
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // within chunks: 2 partial sums each
    w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

// attend_head for a head of NV × 16 floats, the query and the output in registers: scores 16 positions at
// a time (sum16), their exponentials 16 at a time, and the weighted values summed in independent sets of
// registers (one set waited on its own previous sum: four cycles a position). At a batch of 16 rows this
// attention took a quarter of a tang-poet step with one reduction per score and the sums in arrays.
// A float16 cache's next keys and this block's values are asked for a block ahead (prefetch): steps of 16 and
// 32 rows at positions 67-134 took 5-11 % less time (two builds alternating in one process), and about 3 %
// on top of the next head's prefetch (attend_stored); a float32 cache's did not move.
template <int NV, typename T>
void attend_head_avx512(const float* qh, const T* keys, const T* values, int64_t length, float scale,
                        float* weights, float* out) {
  constexpr int64_t hd = 16 * NV;
  __m512 qv[NV];
  for (int v = 0; v < NV; ++v) qv[v] = _mm512_mul_ps(_mm512_loadu_ps(qh + 16 * v), _mm512_set1_ps(scale));
  __m512 top_v = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < length; j += 16) {
    const int64_t left = std::min<int64_t>(16, length - j);
    if constexpr (std::is_same_v<T, at::Half>) {  // the next block's keys; this block's values, for the sums below
      if (j + 16 < length) prefetch<3>(keys + (j + 16) * hd, std::min<int64_t>(16, length - j - 16) * hd);
      prefetch<3>(values + j * hd, left * hd);
    }
    __m512 dots[16];
    for (int p = 0; p < 16; ++p) {
      if (p < left) {
        const T* kp = keys + (j + p) * hd;
        __m512 acc = _mm512_mul_ps(qv[0], load16(kp));
        for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(qv[v], load16(kp + 16 * v), acc);
        dots[slot16(p)] = acc;
      } else {
        dots[slot16(p)] = _mm512_setzero_ps();
      }
    }
    const __mmask16 live = lanes(left);
    const __m512 scores = sum16(dots);
    _mm512_mask_storeu_ps(weights + j, live, scores);
    top_v = _mm512_mask_max_ps(top_v, live, top_v, scores);
  }
  const __m512 inv = _mm512_set1_ps(1.f / exponentiate(weights, length, _mm512_set1_ps(_mm512_reduce_max_ps(top_v))));
  constexpr int kSets = NV <= 2 ? 4 : NV <= 4 ? 2 : 1;  // registers: kSets × NV sums beside the NV queries
  __m512 ov[kSets][NV];
  for (int s = 0; s < kSets; ++s)
    for (int v = 0; v < NV; ++v) ov[s][v] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + kSets <= length; j += kSets)
    for (int s = 0; s < kSets; ++s) {
      const T* vj = values + (j + s) * hd;
      const __m512 w = _mm512_set1_ps(weights[j + s]);
      for (int v = 0; v < NV; ++v) ov[s][v] = _mm512_fmadd_ps(w, load16(vj + 16 * v), ov[s][v]);
    }
  for (; j < length; ++j) {
    const T* vj = values + j * hd;
    const __m512 w = _mm512_set1_ps(weights[j]);
    for (int v = 0; v < NV; ++v) ov[0][v] = _mm512_fmadd_ps(w, load16(vj + 16 * v), ov[0][v]);
  }
  for (int v = 0; v < NV; ++v) {
    __m512 total = ov[0][v];
    for (int s = 1; s < kSets; ++s) total = _mm512_add_ps(total, ov[s][v]);
    _mm512_storeu_ps(out + 16 * v, _mm512_mul_ps(total, inv));
  }
}

// The vector kernel for heads of hd floats stored as T, or null (the plain loops): one for every multiple of
// 16 up to 256.
template <typename T>
using HeadKernel = void (*)(const float*, const T*, const T*, int64_t, float, float*, float*);

template <typename T, size_t... I>
constexpr std::array<HeadKernel<T>, sizeof...(I)> head_kernels(std::index_sequence<I...>) {
  return {attend_head_avx512<I + 1, T>...};
}

template <typename T>
HeadKernel<T> vector_head_kernel(int64_t hd) {
  static constexpr auto kernels = head_kernels<T>(std::make_index_sequence<16>());
  return hd > 0 && hd % 16 == 0 && hd <= 256 ? kernels[hd / 16 - 1] : nullptr;
}
#endif

// Cached keys (or values) of one row and head, positions 0…length-1, as floats: the cache itself when it holds
// floats, else widened into `scratch`.
inline const float* as_floats(const float* stored, int64_t n, std::vector<float>&) { return stored; }
inline const float* as_floats(const at::Half* stored, int64_t n, std::vector<float>& scratch) {
  if (static_cast<int64_t>(scratch.size()) < n) scratch.resize(n);
  for (int64_t d = 0; d < n; ++d) scratch[d] = static_cast<float>(stored[d]);
  return scratch.data();
}

// w[0…n-1] ← softmax(w): less their maximum, exponentials (16 at a time with AVX-512: a 69-token turn over
// 1,900 positions of a 24 M-parameter Qwen2 takes 8 M of them), over their sum.
inline void softmax(float* w, int64_t n) {
#if defined(__AVX512F__)
  __m512 top_v = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = lanes(n - j);
    top_v = _mm512_mask_max_ps(top_v, live, top_v, _mm512_maskz_loadu_ps(live, w + j));
  }
  const __m512 inv = _mm512_set1_ps(1.f / exponentiate(w, n, _mm512_set1_ps(_mm512_reduce_max_ps(top_v))));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = lanes(n - j);
    _mm512_mask_storeu_ps(w + j, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, w + j), inv));
  }
#else
  const float top = *std::max_element(w, w + n);
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) total += (w[j] = std::exp(w[j] - top));
  const float inv = 1.f / total;
  for (int64_t j = 0; j < n; ++j) w[j] *= inv;
#endif
}

constexpr int64_t kRunTokens = 16;  // a prompt's tokens of one row, at least this many: attended as products
constexpr int64_t kQueryBlock = 32;  // its tokens per product: every query head of a key/value head at once

// Attention for n tokens of one row at consecutive positions p0…p0+n-1 (a prompt, or what of it its slot's
// cache lacked), as products: per key/value head and block of tokens, the scores of all their query heads
// against every key the block's last token sees are one sgemm, and the weighted values another, so each key
// is read once a block instead of once a query head and token (at 1,900 cached positions the loops below
// read 4 GB for a 69-token turn of a 24 M-parameter Qwen2). A token's keys past its own position are
// weighted 0 (they are written: its row's later tokens', stored above). The sums run in MKL's order, not
// the loops': the same to a float's rounding.
template <typename T>
void attend_run(const float* q, int64_t q_stride, float* y, const LayerCache& cache, int64_t row, int64_t p0,
                int64_t n, int64_t heads, float scale) {
  const int64_t hd = cache.head_dim, group = heads / cache.kv_heads, length = p0 + n;
  const int64_t rows = std::min(n, kQueryBlock) * group;  // a block's query heads
  std::vector<float> key_scratch, value_scratch, queries(rows * hd), scores(rows * length), out(rows * hd);
  for (int64_t h = 0; h < cache.kv_heads; ++h) {
    const int64_t at = cache.offset(row, h, 0);
    const float* keys = as_floats(cache.at_keys<T>(at), length * hd, key_scratch);
    const float* values = as_floats(cache.at_values<T>(at), length * hd, value_scratch);
    for (int64_t t0 = 0; t0 < n; t0 += kQueryBlock) {
      const int64_t tokens = std::min(kQueryBlock, n - t0), m = tokens * group, span = p0 + t0 + tokens;
      for (int64_t t = 0; t < tokens; ++t)  // row (t, g): token t0+t's query head h·group+g, scaled
        for (int64_t g = 0; g < group; ++g) {
          const float* qh = q + (t0 + t) * q_stride + (h * group + g) * hd;
          float* dst = queries.data() + (t * group + g) * hd;
          for (int64_t d = 0; d < hd; ++d) dst[d] = qh[d] * scale;
        }
      // Column-major BLAS: scoresᵀ (span × m) = keys (span × hd, read transposed) · queriesᵀ (hd × m).
      const int M = static_cast<int>(span), N = static_cast<int>(m), K = static_cast<int>(hd);
      const float one = 1.f, zero = 0.f;
      const char tr = 'T', no = 'N';
      sgemm_(&tr, &no, &M, &N, &K, &one, keys, &K, queries.data(), &K, &zero, scores.data(), &M);
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t seen = p0 + t0 + t + 1;  // positions 0…its own
        for (int64_t g = 0; g < group; ++g) {
          float* w = scores.data() + (t * group + g) * span;
          softmax(w, seen);
          std::fill(w + seen, w + span, 0.f);
        }
      }
      // outᵀ (hd × m) = valuesᵀ (hd × span) · scoresᵀ (span × m).
      sgemm_(&no, &no, &K, &N, &M, &one, values, &K, scores.data(), &M, &zero, out.data(), &K);
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t g = 0; g < group; ++g)
          std::memcpy(y + (t0 + t) * heads * hd + (h * group + g) * hd, out.data() + (t * group + g) * hd,
                      hd * sizeof(float));
    }
  }
}

// Attention for N tokens, token i of cache row rows[i] at position pos[i]. First every token's key and value
// go to their places in the cache, then each token attends over its row's positions 0…pos[i] (the keys the
// module path's mask lets it see), so a prompt's tokens can come in one call: a later token's key is in the
// cache, unseen, while an earlier one attends. Query head h reads key/value head h / (heads / kv_heads).
// A run of kRunTokens or more tokens of one row at consecutive positions (a prompt) attends as products
// (attend_run); the rest, a head at a time.
// q, k, v: token i's at q + i * q_stride (heads × head_dim) and k/v + i * kv_stride (kv_heads × head_dim).
template <typename T>
void attend_stored(const float* q, int64_t q_stride, const float* k, const float* v, int64_t kv_stride, float* y,
                   const LayerCache& cache, const int64_t* rows, const int64_t* pos, int64_t N, int64_t heads,
                   float scale) {
  const int64_t hd = cache.head_dim, group = heads / cache.kv_heads;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < cache.kv_heads; ++h) {
      const int64_t at = cache.offset(rows[i], h, pos[i]);
      store(cache.at_keys<T>(at), k + i * kv_stride + h * hd, hd);
      store(cache.at_values<T>(at), v + i * kv_stride + h * hd, hd);
    }
  // One thread (the part's, when a step is split): the engines run one torch thread each
  // (config.inference_threads), and an OpenMP team here would cost more than the attention of a few rows.
  std::vector<float> weights(cache.capacity + 16);
#if defined(__AVX512F__)
  const HeadKernel<T> vector_head = vector_head_kernel<T>(hd);
#endif
  for (int64_t i = 0; i < N;) {
    int64_t n = 1;
    while (i + n < N && rows[i + n] == rows[i] && pos[i + n] == pos[i] + n) ++n;
    if (n >= kRunTokens) {
      attend_run<T>(q + i * q_stride, q_stride, y + i * heads * hd, cache, rows[i], pos[i], n, heads, scale);
      i += n;
      continue;
    }
    for (int64_t end = i + n; i < end; ++i)
      for (int64_t h = 0; h < heads; ++h) {
        const float* qh = q + i * q_stride + h * hd;
        const T* keys = cache.at_keys<T>(cache.offset(rows[i], h / group, 0));
        const T* values = cache.at_values<T>(cache.offset(rows[i], h / group, 0));
        float* out = y + i * heads * hd + h * hd;
        // The next key/value head's, into L2 while this one computes: with a float16 cache, steps of 16 and 32
        // rows at positions 67-134 took 2-12 % less time (two builds alternating), with float32 within ±4 %.
        if ((h + 1) % group == 0 && N > 1) {
          const int64_t ni = h + 1 < heads ? i : i + 1, nh = h + 1 < heads ? (h + 1) / group : 0;
          if (ni < N) {
            const int64_t at = cache.offset(rows[ni], nh, 0), len = (pos[ni] + 1) * hd;
            prefetch<2>(cache.at_keys<T>(at), len);
            prefetch<2>(cache.at_values<T>(at), len);
          }
        }
#if defined(__AVX512F__)
        if (vector_head != nullptr) {
          vector_head(qh, keys, values, pos[i] + 1, scale, weights.data(), out);
          continue;
        }
#endif
        attend_head(qh, keys, values, pos[i] + 1, hd, scale, weights.data(), out);
      }
  }
}

void attend(const float* q, int64_t q_stride, const float* k, const float* v, int64_t kv_stride, float* y,
            const LayerCache& cache, const int64_t* rows, const int64_t* pos, int64_t N, int64_t heads,
            float scale) {
  if (cache.half)
    attend_stored<at::Half>(q, q_stride, k, v, kv_stride, y, cache, rows, pos, N, heads, scale);
  else
    attend_stored<float>(q, q_stride, k, v, kv_stride, y, cache, rows, pos, N, heads, scale);
}

// Rotary positions, as transformers' apply_rotary_pos_emb: x·cos + rotate_half(x)·sin, where
// rotate_half(x) = (-x[half:], x[:half]); cos and sin (N, head_dim) are the token's own.
void rotate(float* x, int64_t N, int64_t heads, int64_t hd, int64_t stride, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  std::vector<float> t(hd);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      float* a = x + i * stride + h * hd;
      const float* c = cos + i * hd;
      const float* s = sin + i * hd;
      for (int64_t d = 0; d < half; ++d) t[d] = a[d] * c[d] - a[d + half] * s[d];
      for (int64_t d = half; d < hd; ++d) t[d] = a[d] * c[d] + a[d - half] * s[d];
      std::memcpy(a, t.data(), hd * sizeof(float));
    }
}

// The tokens' cache rows and positions, checked while the GIL is held (a bad position is the caller's
// ValueError, as on the module path).
struct Tokens {
  Tensor ids, pos, rows;
  int64_t N;

  Tokens(const Tensor& ids_, const Tensor& pos_, const Tensor& rows_, int64_t vocab, int64_t slots,
         int64_t positions)
      : ids(ids_.contiguous()), pos(pos_.contiguous()), rows(rows_.contiguous()), N(ids_.size(0)) {
    TORCH_CHECK(ids.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && rows.scalar_type() == at::kLong &&
                    pos.size(0) == N && rows.size(0) == N,
                "ids, pos and rows: one int64 per token");
    for (int64_t i = 0; i < N; ++i) {
      const int64_t p = pos.data_ptr<int64_t>()[i], r = rows.data_ptr<int64_t>()[i], t = ids.data_ptr<int64_t>()[i];
      if (p < 0 || p >= positions)
        throw py::value_error("position " + std::to_string(p) + " is past the context of " + std::to_string(positions));
      TORCH_CHECK(r >= 0 && r < slots, "cache row ", r, " out of range");
      TORCH_CHECK(t >= 0 && t < vocab, "token ", t, " out of range");
    }
  }
};

std::vector<LayerCache> layer_caches(std::vector<Tensor>& keys, std::vector<Tensor>& values, int64_t n_layer,
                                     const Tokens& tokens) {
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == n_layer && values.size() == keys.size(), "one cache per layer");
  std::vector<LayerCache> caches;
  for (int64_t l = 0; l < n_layer; ++l) {
    caches.emplace_back(keys[l], values[l]);
    for (int64_t i = 0; i < tokens.N; ++i)
      TORCH_CHECK(tokens.pos.data_ptr<int64_t>()[i] < caches.back().capacity &&
                      tokens.rows.data_ptr<int64_t>()[i] < caches.back().slots,
                  "the cache of layer ", l, " is too small");
  }
  return caches;
}

// The tokens whose logits a step returns: `wanted` (indices into its N tokens, ascending), or all of them. A
// prefill wants each prompt's last token only: the head is a third of a tang-poet token's arithmetic, and at an
// imported model's vocabulary of 150 k tokens a prompt's (T, vocab) logits would take gigabytes.
struct Wanted {
  std::vector<int64_t> at;  // empty: every token
  int64_t M;

  Wanted(const std::optional<Tensor>& wanted, int64_t N) : M(N) {
    if (!wanted.has_value()) return;
    const Tensor w = wanted->contiguous();
    TORCH_CHECK(w.scalar_type() == at::kLong && w.dim() == 1, "wanted: one int64 index per token");
    at.assign(w.data_ptr<int64_t>(), w.data_ptr<int64_t>() + w.size(0));
    for (size_t m = 0; m < at.size(); ++m)
      TORCH_CHECK(at[m] >= 0 && at[m] < N && (m == 0 || at[m] > at[m - 1]), "wanted: ascending token indices");
    M = static_cast<int64_t>(at.size());
  }

  // The logits rows [m0, m1) of the wanted tokens among tokens a…b−1.
  std::pair<int64_t, int64_t> within(int64_t a, int64_t b) const {
    if (at.empty()) return {a, b};
    return {std::lower_bound(at.begin(), at.end(), a) - at.begin(),
            std::lower_bound(at.begin(), at.end(), b) - at.begin()};
  }

  // Those tokens' rows of x (tokens a…, C wide) moved to its first rows (in place: at[m] − a ≥ m − m0).
  void gather(float* x, int64_t C, int64_t a, std::pair<int64_t, int64_t> rows) const {
    if (at.empty()) return;
    for (int64_t m = rows.first; m < rows.second; ++m)
      if (at[m] - a != m - rows.first) std::memcpy(x + (m - rows.first) * C, x + (at[m] - a) * C, C * sizeof(float));
  }
};

// Where a step's N tokens split into up to `parts` runs, one for each thread of the team: a run's cache rows
// are its own, since a prefill's tokens attend to keys that tokens of their row write in the same layer. The
// bounds (first 0, last N) fall between rows near equal shares of tokens; rows not grouped (one seen on both
// sides of a bound) keep the step whole.
std::vector<int64_t> split_rows(const int64_t* rows, int64_t N, int64_t parts, int64_t slots) {
  std::vector<int64_t> bounds{0};
  for (int64_t k = 1; k < parts; ++k) {
    int64_t at = std::max(bounds.back() + 1, N * k / parts);
    while (at < N && rows[at] == rows[at - 1]) ++at;
    if (at >= N) break;
    bounds.push_back(at);
  }
  bounds.push_back(N);
  if (bounds.size() == 2) return bounds;
  std::vector<int64_t> owner(slots, -1);
  for (size_t k = 0; k + 1 < bounds.size(); ++k)
    for (int64_t i = bounds[k]; i < bounds[k + 1]; ++i) {
      if (owner[rows[i]] != -1 && owner[rows[i]] != static_cast<int64_t>(k)) return {0, N};
      owner[rows[i]] = static_cast<int64_t>(k);
    }
  return bounds;
}

// Helper threads that run parts of a step alongside the thread that called it. A step of many rows is
// matrix products that one core computes near its peak (sgemm, ~190 GFLOP/s here), so a second core nearly
// halves it; an OpenMP team for each product instead cost more than it gained (config.inference_threads),
// and parts of whole rows need one hand-over a step, not one per product. Threads sleep between steps.
// Engines that step at the same time (two models, two processes' worth of work) do not share it: the second
// runs its parts one after another, as with no team.
class Team {
 public:
  // fn(0) … fn(parts − 1), fn(0) on this thread; the first exception any threw is rethrown here.
  void run(int parts, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> mine(in_use_, std::try_to_lock);
    if (parts <= 1 || !mine.owns_lock()) {
      for (int k = 0; k < parts; ++k) fn(k);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(m_);
      if (pid_ != ::getpid()) helpers_ = 0, pid_ = ::getpid();  // a forked child has none of its parent's threads
      for (; helpers_ < parts - 1; ++helpers_)
        std::thread([this, id = helpers_ + 1, seen = round_] { serve(id, seen); }).detach();
      task_ = &fn, parts_ = parts, pending_ = parts - 1, error_ = nullptr;
      ++round_;
    }
    start_.notify_all();
    std::exception_ptr error;
    try {
      fn(0);
    } catch (...) {
      error = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [&] { return pending_ == 0; });
    if (!error) error = error_;
    if (error) std::rethrow_exception(error);
  }

 private:
  void serve(int id, int64_t seen) {
    at::internal::lazy_init_num_threads();  // torch's thread count (one) here too, for sgemm and gelu
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      start_.wait(lock, [&] { return round_ != seen; });
      seen = round_;
      if (id >= parts_) continue;
      const std::function<void(int)>* fn = task_;
      lock.unlock();
      std::exception_ptr error;
      try {
        (*fn)(id);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (error && !error_) error_ = error;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex in_use_, m_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int helpers_ = 0, parts_ = 0, pending_ = 0;
  int64_t round_ = 0;
  pid_t pid_ = ::getpid();
  std::exception_ptr error_;
};

Team& team() {
  static Team* shared = new Team;  // never destroyed: its threads outlive static destruction
  return *shared;
}

// run(a, n) for each part of a step's N tokens (split_rows: tokens a…a+n−1), on the team's threads.
void in_parts(const int64_t* rows, int64_t N, int64_t parts, const std::vector<LayerCache>& caches,
              const std::function<void(int64_t, int64_t)>& run) {
  const std::vector<int64_t> bounds = split_rows(rows, N, parts, caches.empty() ? 0 : caches[0].slots);
  team().run(static_cast<int>(bounds.size()) - 1, [&](int k) { run(bounds[k], bounds[k + 1] - bounds[k]); });
}

}  // namespace

// Logits (N, vocab) for tokens ids (N,) of cache rows `rows` at positions `pos`: one new token per row when
// decoding, or every token of the prompts when prefilling (a row's tokens in order). keys/values: one
// (slots, heads, capacity, head_dim) tensor per layer; layers: 12 tensors per block (ln_1 w, b; c_attn w, b;
// attn c_proj w, b; ln_2 w, b; c_fc w, b; mlp c_proj w, b), matrices (in, out); the head (out, in) when
// head_out_in. scales: empty, or one entry per tensor of `layers` — the int8 matrices' per-row scales, None
// for the rest; wte_scale, wpe_scale, head_scale likewise. scale ≤ 0: 1/sqrt(head_dim). gelu: "tanh" or
// "none", as torch's gelu. wanted: None, or the tokens (indices, ascending) whose logits to return, (M, vocab).
// parts: how many threads may share the step (the team's, split_rows), each computing whole rows' tokens.
Tensor gpt2_step(const Tensor& ids, const Tensor& pos, const Tensor& rows, std::vector<Tensor> keys,
                 std::vector<Tensor> values, const Tensor& wte, const std::optional<Tensor>& wte_scale,
                 const Tensor& wpe, const std::optional<Tensor>& wpe_scale, const std::vector<Tensor>& layers,
                 const std::vector<std::optional<Tensor>>& scales, const Tensor& ln_f_weight,
                 const Tensor& ln_f_bias, const Tensor& head, const std::optional<Tensor>& head_scale,
                 const std::optional<Tensor>& head_bias, bool head_out_in, int64_t n_head, double eps, double scale,
                 const std::string& gelu, const std::optional<Tensor>& wanted, int64_t parts) {
  constexpr int kPerLayer = 12;
  const int64_t n_layer = static_cast<int64_t>(layers.size()) / kPerLayer, C = wte.size(1);
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == n_layer * kPerLayer, "12 tensors per layer");
  TORCH_CHECK(scales.empty() || scales.size() == layers.size(), "scales: none, or one entry per layer tensor");
  const Matrix embed(wte, true, wte_scale), positions(wpe, true, wpe_scale);
  std::vector<Matrix> matrices;
  for (int64_t l = 0; l < n_layer; ++l)
    for (int k = 0; k < kPerLayer; ++k) {
      const size_t at = l * kPerLayer + k;
      if (k == 2 || k == 4 || k == 8 || k == 10) {
        matrices.emplace_back(layers[at], false, scales.empty() ? std::nullopt : scales[at]);
      } else {
        check_float(layers[at], "a bias or norm weight");
      }
    }
  for (const Tensor* t : {&ln_f_weight, &ln_f_bias}) check_float(*t, "a norm weight");
  Tokens tokens(ids, pos, rows, wte.size(0), keys.empty() ? 0 : keys[0].size(0), wpe.size(0));
  std::vector<LayerCache> caches = layer_caches(keys, values, n_layer, tokens);
  const Matrix lm_head(head, head_out_in, head_scale);
  const float* lm_bias = data_or_null(head_bias);
  const int64_t N = tokens.N, hd = C / n_head, inner = matrices[2].out;
  const float attn_scale = scale > 0 ? static_cast<float>(scale) : 1.f / std::sqrt(static_cast<float>(hd));
  const float e = static_cast<float>(eps);
  const int64_t* tok = tokens.ids.data_ptr<int64_t>();
  const int64_t* p = tokens.pos.data_ptr<int64_t>();
  const int64_t* r = tokens.rows.data_ptr<int64_t>();
  const Wanted keep(wanted, N);
  Tensor logits = at::empty({keep.M, lm_head.out}, ln_f_weight.options());
  StepDraws draws(logits);
  py::gil_scoped_release no_gil;
  wake_armed();
  auto run = [&](int64_t a, int64_t n) {  // tokens a…a+n−1
    std::vector<float> x(n * C), normed(n * C), qkv(n * 3 * C), y(n * C), hidden(n * inner), where(C);
    Tensor hidden_view = at::from_blob(hidden.data(), {n, inner}, ln_f_weight.options());
    for (int64_t i = 0; i < n; ++i) {
      embed.row(tok[a + i], &x[i * C]);
      positions.row(p[a + i], where.data());
      for (int64_t c = 0; c < C; ++c) x[i * C + c] += where[c];
    }
    for (int64_t l = 0; l < n_layer; ++l) {
      const Tensor* w = &layers[l * kPerLayer];
      const Matrix* m = &matrices[l * 4];
      auto f = [&](int k) { return w[k].data_ptr<float>(); };
      layer_norm(x.data(), normed.data(), f(0), f(1), n, C, e);
      linear(normed.data(), m[0], f(3), qkv.data(), n, false);
      attend(qkv.data(), 3 * C, qkv.data() + C, qkv.data() + 2 * C, 3 * C, y.data(), caches[l], r + a, p + a, n,
             n_head, attn_scale);
      linear(y.data(), m[1], f(5), x.data(), n, true);
      layer_norm(x.data(), normed.data(), f(6), f(7), n, C, e);
      linear(normed.data(), m[2], f(9), hidden.data(), n, false);
      at::gelu_(hidden_view, gelu);
      linear(hidden.data(), m[3], f(11), x.data(), n, true);
    }
    const auto out = keep.within(a, a + n);
    keep.gather(x.data(), C, a, out);
    const int64_t M = out.second - out.first;
    layer_norm(x.data(), normed.data(), ln_f_weight.data_ptr<float>(), ln_f_bias.data_ptr<float>(), M, C, e);
    linear(normed.data(), lm_head, lm_bias, logits.data_ptr<float>() + out.first * lm_head.out, M, false);
    draws.draw(out.first, out.second);  // each part draws its own rows' tokens
  };
  in_parts(r, N, parts, caches, run);
  draws.keep();
  return logits;
}

// Logits (N, vocab) for tokens of the Llama family, as gpt2_step. cos, sin: (N, head_dim), each token's
// rotary angles from the model's own rotary module. layers: 10 per block (input_layernorm w; q|k|v joined
// (in, out) and its bias or None; o_proj and bias; post_attention_layernorm w; gate|up joined and bias;
// down_proj and bias); eps: the two norms' epsilons per layer, then the final norm's; the head, wanted and parts
// as in gpt2_step.
Tensor llama_step(const Tensor& ids, const Tensor& pos, const Tensor& rows, std::vector<Tensor> keys,
                  std::vector<Tensor> values, const Tensor& embed, const Tensor& cos, const Tensor& sin,
                  const std::vector<std::optional<Tensor>>& layers, const std::vector<double>& eps,
                  const Tensor& norm_weight, const Tensor& head, const std::optional<Tensor>& head_bias,
                  bool head_out_in, int64_t n_head, int64_t n_kv, int64_t head_dim, double scale,
                  const std::optional<Tensor>& wanted, int64_t parts) {
  constexpr int kPerLayer = 10;
  const int64_t n_layer = static_cast<int64_t>(layers.size()) / kPerLayer, C = embed.size(1);
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == n_layer * kPerLayer, "10 entries per layer");
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * n_layer + 1, "two epsilons per layer and the final one");
  TORCH_CHECK(n_kv > 0 && n_head % n_kv == 0 && head_dim % 2 == 0, "heads in groups, an even head_dim");
  for (const Tensor* t : {&embed, &cos, &sin, &norm_weight}) check_float(*t, "a weight");
  for (int k : {0, 1, 3, 5, 6, 8})
    for (int64_t l = 0; l < n_layer; ++l) TORCH_CHECK(layers[l * kPerLayer + k].has_value(), "a missing weight");
  // The cache's length is the model's context; the rotary angles come for each token.
  Tokens tokens(ids, pos, rows, embed.size(0), keys.empty() ? 0 : keys[0].size(0), INT64_MAX);
  TORCH_CHECK(cos.size(0) == tokens.N && cos.size(1) == head_dim && sin.sizes() == cos.sizes(), "cos, sin: (N, head_dim)");
  std::vector<LayerCache> caches = layer_caches(keys, values, n_layer, tokens);
  const Matrix lm_head(head, head_out_in);
  const float* lm_bias = data_or_null(head_bias);
  const int64_t N = tokens.N, q_width = n_head * head_dim, kv_width = n_kv * head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width, inner = layers[6]->size(1) / 2;
  const int64_t* tok = tokens.ids.data_ptr<int64_t>();
  const int64_t* p = tokens.pos.data_ptr<int64_t>();
  const int64_t* r = tokens.rows.data_ptr<int64_t>();
  std::vector<const float*> biases;
  for (const auto& t : layers) biases.push_back(data_or_null(t));  // read at the bias entries only
  const Wanted keep(wanted, N);
  Tensor logits = at::empty({keep.M, lm_head.out}, embed.options());
  StepDraws draws(logits);
  py::gil_scoped_release no_gil;
  wake_armed();
  auto run = [&](int64_t a, int64_t n) {  // tokens a…a+n−1
    std::vector<float> x(n * C), normed(n * C), qkv(n * qkv_width), y(n * q_width), gate_up(n * 2 * inner),
        act(n * inner);
    const float* cos_a = cos.data_ptr<float>() + a * head_dim;
    const float* sin_a = sin.data_ptr<float>() + a * head_dim;
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(&x[i * C], embed.data_ptr<float>() + tok[a + i] * C, C * sizeof(float));
    for (int64_t l = 0; l < n_layer; ++l) {
      const std::optional<Tensor>* w = &layers[l * kPerLayer];
      const float* const* b = &biases[l * kPerLayer];
      rms_norm(x.data(), normed.data(), w[0]->data_ptr<float>(), n, C, static_cast<float>(eps[2 * l]));
      linear(normed.data(), Matrix(*w[1], false), b[2], qkv.data(), n, false);
      rotate(qkv.data(), n, n_head, head_dim, qkv_width, cos_a, sin_a);
      rotate(qkv.data() + q_width, n, n_kv, head_dim, qkv_width, cos_a, sin_a);
      attend(qkv.data(), qkv_width, qkv.data() + q_width, qkv.data() + q_width + kv_width, qkv_width, y.data(),
             caches[l], r + a, p + a, n, n_head, static_cast<float>(scale));
      linear(y.data(), Matrix(*w[3], false), b[4], x.data(), n, true);
      rms_norm(x.data(), normed.data(), w[5]->data_ptr<float>(), n, C, static_cast<float>(eps[2 * l + 1]));
      linear(normed.data(), Matrix(*w[6], false), b[7], gate_up.data(), n, false);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < inner; ++j) {
          const float g = gate_up[i * 2 * inner + j], u = gate_up[i * 2 * inner + inner + j];
          act[i * inner + j] = g / (1.f + std::exp(-g)) * u;  // SiLU(gate) · up
        }
      linear(act.data(), Matrix(*w[8], false), b[9], x.data(), n, true);
    }
    const auto out = keep.within(a, a + n);
    keep.gather(x.data(), C, a, out);
    const int64_t M = out.second - out.first;
    rms_norm(x.data(), normed.data(), norm_weight.data_ptr<float>(), M, C, static_cast<float>(eps[2 * n_layer]));
    linear(normed.data(), lm_head, lm_bias, logits.data_ptr<float>() + out.first * lm_head.out, M, false);
    draws.draw(out.first, out.second);  // each part draws its own rows' tokens
  };
  in_parts(r, N, parts, caches, run);
  draws.keep();
  return logits;
}

namespace {

// Row i's draw: the first token whose running sum of exp(logit / t − max) exceeds u · the row's total, which is
// what softmax, cumsum and searchsorted(right=True) give, in three passes instead of three operations and their
// tensors. The running sum goes 16 tokens at a time (each block's sum first), so the scan does not wait on one
// chain of 7,042 additions: ATen's cumsum was a third of the draw's time, its softmax another third. Rounding
// differs from ATen's, so a draw within a float's rounding of a boundary between two tokens may take the
// neighbour (about one draw in 10⁵ at tang-poet's vocabulary).
int64_t draw(float* x, int64_t vocab, float temp, float u, std::vector<float>& blocks) {
  const int64_t nb = (vocab + 15) / 16;
  blocks.resize(nb);
  const bool scaled = temp != 1.f;
#if defined(__AVX512F__)
  const __m512 none = _mm512_set1_ps(-INFINITY);
  __m512 top16 = none;
  for (int64_t k = 0; k < nb; ++k) {
    const __mmask16 live = lanes(vocab - 16 * k);
    __m512 v = _mm512_mask_loadu_ps(none, live, x + 16 * k);
    if (scaled) {
      v = _mm512_div_ps(v, _mm512_set1_ps(temp));
      _mm512_mask_storeu_ps(x + 16 * k, live, v);
    }
    top16 = _mm512_max_ps(top16, v);
  }
  const float top = _mm512_reduce_max_ps(top16);
  const __m512 top_v = _mm512_set1_ps(top);
  for (int64_t k = 0; k < nb; ++k) {
    const __mmask16 live = lanes(vocab - 16 * k);
    const __m512 v = _mm512_mask_loadu_ps(none, live, x + 16 * k);
    const __mmask16 drawable = _mm512_cmp_ps_mask(v, none, _CMP_NEQ_UQ) & live;  // banned: exactly 0
    const __m512 e = _mm512_maskz_mov_ps(drawable, exp16(_mm512_sub_ps(v, top_v)));
    _mm512_mask_storeu_ps(x + 16 * k, live, e);
    blocks[k] = _mm512_reduce_add_ps(e);
  }
#else
  float top = -INFINITY;
  for (int64_t j = 0; j < vocab; ++j) {
    if (scaled) x[j] /= temp;
    top = std::max(top, x[j]);
  }
  for (int64_t k = 0; k < nb; ++k) {
    float sum = 0.f;
    for (int64_t j = 16 * k; j < std::min(vocab, 16 * k + 16); ++j) {
      x[j] = x[j] == -INFINITY ? 0.f : std::exp(x[j] - top);
      sum += x[j];
    }
    blocks[k] = sum;
  }
#endif
  float total = 0.f;
  for (float block : blocks) total += block;
  const float threshold = u * total;
  float running = 0.f;
  for (int64_t k = 0; k < nb; ++k) {
    if (running + blocks[k] <= threshold) {
      running += blocks[k];
      continue;
    }
    for (int64_t j = 16 * k; j < std::min(vocab, 16 * k + 16); ++j) {
      running += x[j];
      if (running > threshold) return j;
    }
  }
  for (int64_t j = vocab - 1; j > 0; --j)  // u · total rounded up to the total: the last token that can be drawn
    if (x[j] > 0.f) return j;
  return vocab - 1;
}

}  // namespace

// Tokens (B,) drawn from logits (B, vocab), edited in place: banned[i]'s ids of row i never drawn; row i at
// temperature temps[i] (0: the most likely token) with one uniform number from generators[i] (drawn from every
// row's generator, greedy rows too, as the Python path does). sampling.py's steps 1, 4 and 5 for rows without
// penalties, top-k, top-p, min-p or log-probabilities.
std::vector<int64_t> sample_plain(Tensor logits, std::vector<std::vector<int64_t>> banned, std::vector<double> temps,
                                  std::vector<at::Generator> generators) {
  check_float(logits, "logits");
  const Draws d{std::move(banned), std::move(temps), std::move(generators)};
  d.check(logits, "sample_plain");
  const int64_t B = logits.size(0), vocab = logits.size(1);
  py::gil_scoped_release no_gil;
  float* data = logits.data_ptr<float>();
  std::vector<int64_t> out(B);
  std::vector<float> blocks;
  for (int64_t i = 0; i < B; ++i) out[i] = draw_row(data + i * vocab, vocab, d, i, blocks);
  return out;
}

namespace {

// Row i's token (its logits at `row`, edited in place), with its banned ids, temperature and generator.
int64_t draw_row(float* row, int64_t vocab, const Draws& d, int64_t i, std::vector<float>& blocks) {
  for (int64_t id : d.banned[i]) row[id] = -INFINITY;
  const float u = at::rand({1}, d.generators[i]).item<float>();
  if (d.temps[i] == 0.0) return std::max_element(row, row + vocab) - row;  // the first of the most likely, as argmax
  return draw(row, vocab, static_cast<float>(d.temps[i]), u, blocks);
}

}  // namespace

// The next gpt2_step or llama_step on this thread draws a token for each row of its logits, as sample_plain
// with these arguments would (the logits are edited in place as there); drawn() returns them.
void draw_next(std::vector<std::vector<int64_t>> banned, std::vector<double> temps,
               std::vector<at::Generator> generators) {
  next_draws = Draws{std::move(banned), std::move(temps), std::move(generators)};
  last_drawn.reset();
}

// The tokens the last step drew (draw_next), or None when no step took the draws (they are dropped).
std::optional<std::vector<int64_t>> drawn() {
  next_draws.reset();
  std::optional<std::vector<int64_t>> tokens;
  tokens.swap(last_drawn);
  return tokens;
}

// The pipes the next gpt2_step or llama_step on this thread writes to, and those it has not written to
// (the step did not run: the caller wakes them itself).
void arm_wake(std::vector<int> fds) { armed = std::move(fds); }

std::vector<int> disarm() {
  std::vector<int> left;
  left.swap(armed);
  return left;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("arm_wake", &arm_wake);
  m.def("draw_next", &draw_next);
  m.def("drawn", &drawn);
  m.def("disarm", &disarm);
  m.def("gpt2_step", &gpt2_step);
  m.def("llama_step", &llama_step);
  m.def("sample_plain", &sample_plain);
}
