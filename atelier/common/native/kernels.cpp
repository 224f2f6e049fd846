// Atelier's native kernels: the two things a decoding step does once per token, each one call from
// Python that holds no GIL while it runs.
//
//   gpt2_step   one new token for each of B rows through a GPT-2 block stack (atelier/models/chargpt.py's
//               Decoder.step), writing keys and values into the KV cache and attending over it
//   sample_plain  the inverse-CDF draw of atelier/runtime/sampling.py for rows that ask for nothing but a
//               temperature, with the same ATen operations in the same order (so the same tokens)
//
// Why C++: at batch 1 a tang-poet step reads 16 MB of weights in about 0.6 ms, and the hundred or so
// tensor operations around those reads cost as much again when each crosses from Python (and takes the
// GIL back from the event loop). Here the matrix products are still MKL's sgemm, called directly, and
// the glue (embedding, LayerNorm, biases, residuals, attention over the cache) is plain loops.
// Built on the machine that runs it by `make` (python -m atelier.common.native), with -march=native.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace py = pybind11;
using at::Tensor;

// MKL's single-precision GEMM, exported by libtorch_cpu (the one ATen's addmm runs on).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr int kLayerTensors = 12;  // ln_1 w, b; c_attn w, b; c_proj w, b; ln_2 w, b; c_fc w, b; mlp.c_proj w, b

// One new token per row: write its key and value at position pos[b] of cache row rows[b], then attend
// over that row's positions 0…pos[b] (the same keys the module path's mask lets it see).
// qkv (B, 3C) holds each row's query, key and value; y (B, C) receives the attention output;
// kv points at this layer's (2, slots, n_head, positions, head_dim) block.
void attend(const float* qkv, float* y, float* kv, const int64_t* rows, const int64_t* pos, int64_t B,
            int64_t C, int64_t n_head, int64_t slots, int64_t positions, int64_t hs) {
  const int64_t head_stride = positions * hs, slot_stride = n_head * head_stride, kv_stride = slots * slot_stride;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  at::parallel_for(0, B * n_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(positions);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_head, h = task % n_head, p = pos[b];
      const float* row = qkv + b * 3 * C;
      const float* q = row + h * hs;
      float* k = kv + rows[b] * slot_stride + h * head_stride;
      float* v = k + kv_stride;
      std::memcpy(k + p * hs, row + C + h * hs, hs * sizeof(float));
      std::memcpy(v + p * hs, row + 2 * C + h * hs, hs * sizeof(float));
      float top = 0.f;
      for (int64_t j = 0; j <= p; ++j) {
        const float* kj = k + j * hs;
        float s = 0.f;
        for (int64_t d = 0; d < hs; ++d) s += q[d] * kj[d];
        weights[j] = s * scale;
        top = (j == 0 || weights[j] > top) ? weights[j] : top;
      }
      float total = 0.f;
      for (int64_t j = 0; j <= p; ++j) {
        weights[j] = std::exp(weights[j] - top);
        total += weights[j];
      }
      float* out = y + b * C + h * hs;
      std::fill(out, out + hs, 0.f);
      for (int64_t j = 0; j <= p; ++j) {
        const float* vj = v + j * hs;
        const float w = weights[j] / total;
        for (int64_t d = 0; d < hs; ++d) out[d] += w * vj[d];
      }
    }
  });
}

// out (B, N) = x (B, K) · w (K, N) + bias (N), added to what out holds when `accumulate` (a residual).
// MKL's sgemm, as ATen's addmm calls it, without a tensor or a dispatch around each product.
void linear(const float* x, const float* w, const float* bias, float* out, int64_t B, int64_t K, int64_t N,
            bool accumulate) {
  if (bias != nullptr) {
    for (int64_t b = 0; b < B; ++b) {
      float* o = out + b * N;
      if (accumulate) {
        for (int64_t n = 0; n < N; ++n) o[n] += bias[n];
      } else {
        std::memcpy(o, bias, N * sizeof(float));
      }
    }
  }
  // Column-major BLAS sees the row-major (K, N) weight as its transpose: outᵀ = wᵀ · xᵀ.
  const char no = 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(B), k = static_cast<int>(K);
  const float one = 1.f, beta = (accumulate || bias != nullptr) ? 1.f : 0.f;
  sgemm_(&no, &no, &m, &n, &k, &one, w, &m, x, &k, &beta, out, &m);
}

// LayerNorm over the last dimension (C) of x (B, C), as torch.layer_norm: biased variance, eps inside the root.
void layer_norm(const float* x, float* out, const float* weight, const float* bias, int64_t B, int64_t C,
                float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* row = x + b * C;
    float* o = out + b * C;
    float sum = 0.f;
    for (int64_t c = 0; c < C; ++c) sum += row[c];
    const float mean = sum / C;
    float sq = 0.f;
    for (int64_t c = 0; c < C; ++c) sq += (row[c] - mean) * (row[c] - mean);
    const float inv = 1.f / std::sqrt(sq / C + eps);
    for (int64_t c = 0; c < C; ++c) o[c] = (row[c] - mean) * inv * weight[c] + bias[c];
  }
}

void check_float(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), what,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace

// Logits (B, vocab) for token ids (B,) of cache rows `rows` (B,) at positions `pos` (B,).
// kv: (n_layer, 2, slots, n_head, positions, head_dim); layers: 12 tensors per block, matrices as (in, out).
Tensor gpt2_step(const Tensor& ids, const Tensor& pos, const Tensor& rows, Tensor kv, const Tensor& wte,
                 const Tensor& wpe, const std::vector<Tensor>& layers, const Tensor& ln_f_weight,
                 const Tensor& ln_f_bias, const Tensor& head, int64_t n_head, double eps) {
  const int64_t B = ids.size(0), C = wte.size(1), vocab = head.size(1), n_layer = kv.size(0),
                slots = kv.size(2), positions = kv.size(4), hs = C / n_head;
  check_float(kv, "the KV cache");
  TORCH_CHECK(kv.dim() == 6 && kv.size(1) == 2 && kv.size(3) == n_head && kv.size(5) == hs, "KV cache shape");
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == n_layer * kLayerTensors, "12 tensors per layer");
  for (const Tensor& t : layers) check_float(t, "a weight");
  for (const Tensor* t : {&wte, &wpe, &ln_f_weight, &ln_f_bias, &head}) check_float(*t, "a weight");
  const Tensor ids_ = ids.contiguous(), pos_ = pos.contiguous(), rows_ = rows.contiguous();
  TORCH_CHECK(ids_.scalar_type() == at::kLong && pos_.scalar_type() == at::kLong && rows_.scalar_type() == at::kLong &&
              pos_.size(0) == B && rows_.size(0) == B, "ids, pos and rows: one int64 per row");
  const int64_t* tok = ids_.data_ptr<int64_t>();
  const int64_t* p = pos_.data_ptr<int64_t>();
  const int64_t* r = rows_.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    if (p[b] < 0 || p[b] >= positions) throw py::value_error("position " + std::to_string(p[b]) +
                                                             " is past the context of " + std::to_string(positions));
    TORCH_CHECK(r[b] >= 0 && r[b] < slots, "cache row ", r[b], " out of range");
    TORCH_CHECK(tok[b] >= 0 && tok[b] < wte.size(0), "token ", tok[b], " out of range");
  }
  const int64_t inner = layers[8].size(1);
  Tensor logits = at::empty({B, vocab}, wte.options());
  py::gil_scoped_release no_gil;
  std::vector<float> x(B * C), normed(B * C), qkv(B * 3 * C), y(B * C), hidden(B * inner);
  for (int64_t b = 0; b < B; ++b) {
    const float* e = wte.data_ptr<float>() + tok[b] * C;
    const float* q = wpe.data_ptr<float>() + p[b] * C;
    for (int64_t c = 0; c < C; ++c) x[b * C + c] = e[c] + q[c];
  }
  Tensor hidden_view = at::from_blob(hidden.data(), {B, inner}, wte.options());
  float* cache = kv.data_ptr<float>();
  for (int64_t l = 0; l < n_layer; ++l) {
    const Tensor* w = &layers[l * kLayerTensors];
    auto f = [&](int i) { return w[i].data_ptr<float>(); };
    layer_norm(x.data(), normed.data(), f(0), f(1), B, C, static_cast<float>(eps));
    linear(normed.data(), f(2), f(3), qkv.data(), B, C, 3 * C, false);
    attend(qkv.data(), y.data(), cache + l * kv.stride(0), r, p, B, C, n_head, slots, positions, hs);
    linear(y.data(), f(4), f(5), x.data(), B, C, C, true);
    layer_norm(x.data(), normed.data(), f(6), f(7), B, C, static_cast<float>(eps));
    linear(normed.data(), f(8), f(9), hidden.data(), B, C, inner, false);
    at::gelu_(hidden_view, "tanh");
    linear(hidden.data(), f(10), f(11), x.data(), B, inner, C, true);
  }
  layer_norm(x.data(), normed.data(), ln_f_weight.data_ptr<float>(), ln_f_bias.data_ptr<float>(), B, C,
             static_cast<float>(eps));
  linear(normed.data(), head.data_ptr<float>(), nullptr, logits.data_ptr<float>(), B, C, vocab, false);
  return logits;
}

// Tokens (B,) drawn from logits (B, vocab), edited in place: banned[i]'s ids of row i never drawn; row i at
// temperature temps[i] (0: the most likely token) with one uniform number from generators[i].
// sampling.py's steps 1, 4 and 5 for rows without penalties, top-k, top-p, min-p or log-probabilities.
std::vector<int64_t> sample_plain(Tensor logits, const std::vector<std::vector<int64_t>>& banned,
                                  const std::vector<double>& temps, std::vector<at::Generator> generators) {
  check_float(logits, "logits");
  const int64_t B = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(static_cast<int64_t>(banned.size()) == B && static_cast<int64_t>(temps.size()) == B &&
              static_cast<int64_t>(generators.size()) == B, "one banned list, temperature and generator per row");
  for (int64_t i = 0; i < B; ++i)
    for (int64_t id : banned[i]) TORCH_CHECK(id >= 0 && id < vocab, "banned id ", id, " out of range");
  py::gil_scoped_release no_gil;
  float* data = logits.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i)
    for (int64_t id : banned[i]) data[i * vocab + id] = -INFINITY;
  bool scaled = false, greedy = false;
  for (double t : temps) {
    scaled |= (t != 0.0 && t != 1.0);
    greedy |= (t == 0.0);
  }
  Tensor scaled_logits = logits;
  if (scaled) {
    std::vector<float> divisors(temps.begin(), temps.end());
    for (auto& d : divisors) d = d == 0.f ? 1.f : d;
    scaled_logits = logits / at::tensor(divisors).unsqueeze(1);
  }
  Tensor cdf = at::softmax(scaled_logits, -1).cumsum(-1);
  std::vector<Tensor> draws;
  draws.reserve(B);
  for (auto& g : generators) draws.push_back(at::rand({1}, g));
  Tensor u = at::cat(draws);
  Tensor tokens = at::searchsorted(cdf, (u * cdf.select(1, vocab - 1)).unsqueeze(1), /*out_int32=*/false,
                                   /*right=*/true).squeeze(1).clamp_(c10::nullopt, vocab - 1);
  std::vector<int64_t> out(tokens.data_ptr<int64_t>(), tokens.data_ptr<int64_t>() + B);
  if (greedy) {
    Tensor best = logits.argmax(-1);
    for (int64_t i = 0; i < B; ++i)
      if (temps[i] == 0.0) out[i] = best[i].item<int64_t>();
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gpt2_step", &gpt2_step);
  m.def("sample_plain", &sample_plain);
}
