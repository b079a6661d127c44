// The fused CPU path of OneBit's layer (lightning_ext.nn.onebit_fused, fused=True).
//
// Y = [(X ⊙ g) sign(W)ᵀ] ⊙ h is the linear map X ↦ X W_effᵀ with W_eff[r, c] = h[r] · sign(W[r, c]) · g[c], so the
// value vectors can act on the (out × in) weight instead of the (tokens × in) input and the (tokens × out) output:
// no activation-sized elementwise pass remains in either direction (eager has two forward and four backward).
//
//   effective_weight           one pass: W_eff from the latent W and g, h;
//   effective_weight_backward  one pass: from dW_eff = dYᵀ X and t = tanh(W) (ATen's, vectorised),
//                              dW = dW_eff · h[r] g[c] · (1.001 − t²)   (the reference's sign surrogate),
//                              dh[r] = Σ_c dW_eff · sign · g[c],   dg[c] = Σ_r dW_eff · sign · h[r]
//                              (per-thread partial column sums, added at the end).
//
// sign(w) = +1 where w >= 0, else −1, as sign_pm1; tanh keeps the sign of w (also of −0 and NaN), so the backward
// reads the sign from t. Written for this project; no code was taken from elsewhere.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 1 << 15;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

void check(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim,
              "-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble, name,
              " must be float32 or float64");
}

void check_vectors(const torch::Tensor& w, const torch::Tensor& g, const torch::Tensor& h) {
  check(w, 2, "weight");
  check(g, 1, "g");
  check(h, 1, "h");
  TORCH_CHECK(g.size(0) == w.size(1) && h.size(0) == w.size(0) && g.scalar_type() == w.scalar_type() &&
                  h.scalar_type() == w.scalar_type(),
              "g must have in_features and h out_features entries, in the weight's dtype");
}

torch::Tensor effective_weight(const torch::Tensor& w, const torch::Tensor& g, const torch::Tensor& h) {
  check_vectors(w, g, h);
  const int64_t rows = w.size(0), cols = w.size(1);
  auto out = torch::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "effective_weight", [&] {
    const scalar_t* lat = w.data_ptr<scalar_t>();
    const scalar_t* gv = g.data_ptr<scalar_t>();
    const scalar_t* hv = h.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t hr = hv[r];
        const scalar_t* in = lat + r * cols;
        scalar_t* o = dst + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          const scalar_t hg = hr * gv[c];
          o[c] = in[c] >= 0 ? hg : -hg;
        }
      }
    });
  });
  return out;
}

// Returns (dW, dg, dh).
std::vector<torch::Tensor> effective_weight_backward(const torch::Tensor& grad, const torch::Tensor& t,
                                                     const torch::Tensor& g, const torch::Tensor& h) {
  check_vectors(t, g, h);
  check(grad, 2, "grad");
  TORCH_CHECK(grad.sizes() == t.sizes() && grad.scalar_type() == t.scalar_type(), "grad must match tanh(weight)");
  const int64_t rows = t.size(0), cols = t.size(1);
  auto dw = torch::empty_like(t);
  auto dh = torch::empty_like(h);
  const int64_t threads = at::get_num_threads();
  auto partial = torch::zeros({threads, cols}, g.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "effective_weight_backward", [&] {
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    const scalar_t* th = t.data_ptr<scalar_t>();
    const scalar_t* gv = g.data_ptr<scalar_t>();
    const scalar_t* hv = h.data_ptr<scalar_t>();
    scalar_t* dwp = dw.data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    scalar_t* parts = partial.data_ptr<scalar_t>();
    const scalar_t keep = static_cast<scalar_t>(1.001);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      scalar_t* dg = parts + at::get_thread_num() * cols;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t hr = hv[r];
        const scalar_t* d = gr + r * cols;
        const scalar_t* tr = th + r * cols;
        scalar_t* o = dwp + r * cols;
        scalar_t row_sum = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const scalar_t signed_d = tr[c] >= 0 ? d[c] : -d[c];
          row_sum += signed_d * gv[c];
          dg[c] += signed_d * hr;
          o[c] = d[c] * (hr * gv[c]) * (keep - tr[c] * tr[c]);
        }
        dhp[r] = row_sum;
      }
    });
  });
  return {dw, partial.sum(0), dh};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("effective_weight", &effective_weight, "h[r] * sign(W[r, c]) * g[c], one pass");
  m.def("effective_weight_backward", &effective_weight_backward,
        "(dW through the tanh surrogate, dg, dh) from dW_eff and tanh(W), one pass");
}
