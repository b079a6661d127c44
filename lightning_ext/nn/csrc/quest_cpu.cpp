// The fused CPU path of QuEST's quantized operands (lightning_ext.nn.quest, fused=True).
//
// Eager, one operand costs about fifteen ATen passes over an activation-sized tensor: the rotation matmul, then
// divide, clamp, add, round, add, subtract, multiply, subtract, abs, compare for the quantizer and the trust
// mask, and in the backward a mask multiply and the rotation's matmul again. Here:
//
//   rotate_rows       one pass: every `block`-wide chunk of each row through the Walsh-Hadamard butterflies
//                     (log2(block) add/subtract stages in cache, block·log2(block) additions instead of the
//                     matmul's block² multiply-adds), then divided by sqrt(block);
//   quantize_rows     one pass: codes, dequantized values and the trust mask from the rotated row and its step
//                     (the step itself, a row reduction, stays ATen's, so that both paths use the same one);
//   rotate_rows_back  one pass: the mask applied to the incoming gradient and the transposed rotation.
//
// Bit for bit: each function performs, element by element, the same IEEE operations in the same order as the
// eager reference (lightning_ext.nn.hadamard.fwht's butterflies and division; quest_quantize's divide, clamp,
// add 1/2, round half to even, shift; trust_quantize's |q - u| <= step·t/2 and grad·mask; autograd's reverse
// butterflies). The build must therefore not reassociate or contract: -ffp-contract=off, no -ffast-math.
// Written for this project; no code was taken from elsewhere.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrainElements = 1 << 15;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

// One butterfly stage of distance h over a block: (a, b) -> (a + b, a - b), as fwht's stack of a + b, a - b (and,
// backward, autograd's (g1, g2) -> (g1 + g2, g1 - g2): the same operation).
template <typename T>
inline void stage(T* y, int64_t block, int64_t h) {
  for (int64_t i = 0; i < block; i += 2 * h) {
    T* a = y + i;
    T* b = y + i + h;
    for (int64_t j = 0; j < h; ++j) {
      const T x = a[j], z = b[j];
      a[j] = x + z;
      b[j] = x - z;
    }
  }
}

// y <- butterflies of y, stages h = 1, 2, 4, ...
template <typename T>
inline void butterflies(T* y, int64_t block) {
  for (int64_t h = 1; h < block; h *= 2) stage(y, block, h);
}

// The adjoint of `butterflies` as autograd computes it: the same stages in reverse order.
template <typename T>
inline void butterflies_back(T* y, int64_t block) {
  for (int64_t h = block / 2; h >= 1; h /= 2) stage(y, block, h);
}

#if defined(__AVX512F__)
// One butterfly stage of distance h < 16 inside a register of 16 floats: lane i pairs with lane i ^ h; the lower
// lane of a pair gets a + b, the upper one a - b (p - x there, with p holding a).
inline __m512 stage_in_register(__m512 x, __m512i partner, __mmask16 upper) {
  const __m512 p = _mm512_permutexvar_ps(partner, x);
  return _mm512_mask_blend_ps(upper, _mm512_add_ps(x, p), _mm512_sub_ps(p, x));
}

struct InRegisterStages {
  __m512i partner[4];
  __mmask16 upper[4];
  InRegisterStages() {
    for (int s = 0; s < 4; ++s) {
      const int h = 1 << s;
      alignas(64) int32_t idx[16];
      __mmask16 up = 0;
      for (int i = 0; i < 16; ++i) {
        idx[i] = i ^ h;
        if (i & h) up |= static_cast<__mmask16>(1u << i);
      }
      partner[s] = _mm512_load_si512(idx);
      upper[s] = up;
    }
  }
};

// A block of 16·R floats in R registers: the stages in the given order, across registers for h >= 16.
template <int R>
inline void register_stages(__m512 (&v)[R], const InRegisterStages& st, bool reverse) {
  auto across = [&](int hr) {  // h = 16·hr
    for (int i = 0; i < R; i += 2 * hr) {
      for (int j = i; j < i + hr; ++j) {
        const __m512 a = v[j], b = v[j + hr];
        v[j] = _mm512_add_ps(a, b);
        v[j + hr] = _mm512_sub_ps(a, b);
      }
    }
  };
  if (!reverse) {
    for (int s = 0; s < 4; ++s)
      for (int k = 0; k < R; ++k) v[k] = stage_in_register(v[k], st.partner[s], st.upper[s]);
    for (int hr = 1; hr < R; hr *= 2) across(hr);
  } else {
    for (int hr = R / 2; hr >= 1; hr /= 2) across(hr);
    for (int s = 3; s >= 0; --s)
      for (int k = 0; k < R; ++k) v[k] = stage_in_register(v[k], st.partner[s], st.upper[s]);
  }
}

// Forward rotation of one row, blocks of 128 floats kept in 8 registers. Returns false if block != 128.
inline bool rotate_row_avx512(const float* x, float* y, int64_t cols, int64_t block, float root) {
  if (block != 128) return false;
  static const InRegisterStages st;
  const __m512 vroot = _mm512_set1_ps(root);
  for (int64_t c = 0; c < cols; c += 128) {
    __m512 v[8];
    for (int k = 0; k < 8; ++k) v[k] = _mm512_loadu_ps(x + c + 16 * k);
    register_stages<8>(v, st, false);
    for (int k = 0; k < 8; ++k) _mm512_storeu_ps(y + c + 16 * k, _mm512_div_ps(v[k], vroot));
  }
  return true;
}

// grad · mask, / sqrt(128), reverse stages: one row, blocks of 128 in registers. Returns false if block != 128.
inline bool rotate_row_back_avx512(const float* g, const bool* m, float* y, int64_t cols, int64_t block, float root) {
  if (block != 128) return false;
  static const InRegisterStages st;
  const __m512 vroot = _mm512_set1_ps(root);
  for (int64_t c = 0; c < cols; c += 128) {
    __m512 v[8];
    for (int k = 0; k < 8; ++k) {
      v[k] = _mm512_loadu_ps(g + c + 16 * k);
      if (m != nullptr) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m + c + 16 * k));
        v[k] = _mm512_mul_ps(v[k], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)));
      }
      v[k] = _mm512_div_ps(v[k], vroot);
    }
    register_stages<8>(v, st, true);
    for (int k = 0; k < 8; ++k) _mm512_storeu_ps(y + c + 16 * k, v[k]);
  }
  return true;
}
#endif

template <typename T>
inline bool rotate_row_vector(const T*, T*, int64_t, int64_t, T) { return false; }
template <typename T>
inline bool rotate_row_back_vector(const T*, const bool*, T*, int64_t, int64_t, T) { return false; }
#if defined(__AVX512F__)
template <>
inline bool rotate_row_vector<float>(const float* x, float* y, int64_t cols, int64_t block, float root) {
  return rotate_row_avx512(x, y, cols, block, root);
}
template <>
inline bool rotate_row_back_vector<float>(const float* g, const bool* m, float* y, int64_t cols, int64_t block,
                                          float root) {
  return rotate_row_back_avx512(g, m, y, cols, block, root);
}
#endif

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble, name,
              " must be float32 or float64");
}

// Forward rotation: out = fwht(x, block) (butterflies, then / sqrt(block)).
torch::Tensor rotate_rows(const torch::Tensor& x, int64_t block) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0 && cols % block == 0, "block must be a power of two dividing ",
              cols);
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rotate_rows", [&] {
    const scalar_t root = static_cast<scalar_t>(std::sqrt(static_cast<double>(block)));
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* y = dst + r * cols;
        if (rotate_row_vector<scalar_t>(src + r * cols, y, cols, block, root)) continue;
        std::copy(src + r * cols, src + (r + 1) * cols, y);
        for (int64_t c = 0; c < cols; c += block) butterflies(y + c, block);
        for (int64_t c = 0; c < cols; ++c) y[c] = y[c] / root;
      }
    });
  });
  return out;
}

// Quantize each row of u with its step (rows x 1): returns (q, mask); mask is None when trust < 0 (plain STE).
std::vector<torch::Tensor> quantize_rows(const torch::Tensor& u, const torch::Tensor& step, int64_t bits,
                                         double trust) {
  check_rows(u, "u");
  TORCH_CHECK(step.scalar_type() == u.scalar_type() && step.is_contiguous() && step.numel() == u.size(0),
              "step must hold one value per row, in u's dtype");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in [1, 8]");
  const int64_t rows = u.size(0), cols = u.size(1);
  auto q = torch::empty_like(u);
  const bool masked = trust >= 0;
  auto mask = masked ? torch::empty({rows, cols}, u.options().dtype(torch::kBool)) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "quantize_rows", [&] {
    // the Python scalars of quest_quantize, converted to the tensor's dtype as ATen does
    const double half_d = (std::ldexp(1.0, static_cast<int>(bits)) - 1) / 2;
    const scalar_t half = static_cast<scalar_t>(half_d), neg_half = static_cast<scalar_t>(-half_d);
    const scalar_t point_five = static_cast<scalar_t>(0.5), shift = static_cast<scalar_t>(half_d - 0.5);
    const scalar_t trust_half = static_cast<scalar_t>(trust / 2);
    const scalar_t* src = u.data_ptr<scalar_t>();
    const scalar_t* steps = step.data_ptr<scalar_t>();
    scalar_t* dst = q.data_ptr<scalar_t>();
    bool* keep = masked ? mask.data_ptr<bool>() : nullptr;
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t s = steps[r];
        const scalar_t limit = s * trust_half;
        const scalar_t* in = src + r * cols;
        scalar_t* out = dst + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          // ATen's clamp, NaN kept (both comparisons false), written branch-free so that the loop vectorises
          scalar_t v = in[c] / s;
          v = v < neg_half ? neg_half : v;
          v = v > half ? half : v;
          const scalar_t code = std::nearbyint(v + point_five) + shift;
          out[c] = (code - half) * s;
        }
        if (masked) {
          bool* m = keep + r * cols;
          for (int64_t c = 0; c < cols; ++c) m[c] = std::abs(out[c] - in[c]) <= limit;
        }
      }
    });
  });
  return {q, mask};
}

// Backward of quantize (grad · mask; mask None: the gradient itself) followed, when block > 0, by the adjoint of
// rotate_rows (/ sqrt(block), then the reverse butterflies).
torch::Tensor rotate_rows_back(const torch::Tensor& grad, const c10::optional<torch::Tensor>& mask_or_none,
                               int64_t block) {
  check_rows(grad, "grad");
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const bool masked = mask_or_none.has_value() && mask_or_none->defined();
  const torch::Tensor mask = masked ? *mask_or_none : torch::Tensor();
  if (masked) {
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.sizes() == grad.sizes(),
                "mask must be a contiguous bool tensor of grad's shape");
  }
  TORCH_CHECK(block == 0 || ((block & (block - 1)) == 0 && cols % block == 0), "block must be 0 or a power of two "
              "dividing ", cols);
  auto out = torch::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rotate_rows_back", [&] {
    const scalar_t root = static_cast<scalar_t>(std::sqrt(static_cast<double>(block > 0 ? block : 1)));
    const scalar_t* src = grad.data_ptr<scalar_t>();
    const bool* keep = masked ? mask.data_ptr<bool>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = src + r * cols;
        scalar_t* y = dst + r * cols;
        if (block > 0 && rotate_row_back_vector<scalar_t>(g, masked ? keep + r * cols : nullptr, y, cols, block, root))
          continue;
        if (masked) {
          const bool* m = keep + r * cols;
          for (int64_t c = 0; c < cols; ++c) y[c] = g[c] * static_cast<scalar_t>(m[c]);
        } else {
          std::copy(g, g + cols, y);
        }
        if (block > 0) {
          for (int64_t c = 0; c < cols; ++c) y[c] = y[c] / root;
          for (int64_t c = 0; c < cols; c += block) butterflies_back(y + c, block);
        }
      }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotate_rows", &rotate_rows, "block Walsh-Hadamard rotation of each row (butterflies, / sqrt(block))");
  m.def("quantize_rows", &quantize_rows, "QuEST's centred-grid quantizer and trust mask, one pass");
  m.def("rotate_rows_back", &rotate_rows_back, "grad * mask, then the adjoint rotation, one pass");
}
