// Fused CPU steps for AdamP, SGDP and FAdam (lightning_ext.optimizers, fused=True).
//
// Each tensor is updated in one to three passes over memory instead of the eager path's ~20 kernels,
// parallel over rows (AdamP/SGDP) or chunks (FAdam):
//   AdamP/SGDP: the scale-invariance test reads w and g (|w|^2, |g|^2, <g,w> per row); then one pass
//           updates the moments and applies the (per-row projected) update, or, for the per-tensor
//           projection, a pass collecting <w,d> and a second one applying it;
//   FAdam:  the RMS of g; a pass updating the Fisher and collecting the sums of squares of g/D and w/D;
//           a pass applying the clipped update.
// The arithmetic follows the eager single-tensor path operation by operation, so float64 results
// agree with it (and with the references) to rounding; see tests/test_fused_optimizers.py.
// Written for this project from the papers' algorithms; no code was taken from elsewhere.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 1 << 14;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

// Rows of a tensor seen as [size(0), numel / size(0)]; 0-d and 1-D tensors are one row.
std::pair<int64_t, int64_t> rows_cols(const at::Tensor& t) {
  if (t.dim() < 2) return {1, std::max<int64_t>(t.numel(), 1)};
  return {t.size(0), t.numel() / std::max<int64_t>(t.size(0), 1)};
}

// The scale-invariance test of AdamP/SGDP (see _projection.py). It needs only |w|^2, |g|^2 and <g, w> per
// row, which do not depend on the moments: the test runs first, on one read of w and g.
enum class Projection { kNone, kChannel, kLayer };

Projection decide(const std::vector<double>& ww, const std::vector<double>& gg, const std::vector<double>& gw,
                  int64_t cols, double delta, double eps) {
  const int64_t rows = static_cast<int64_t>(ww.size());
  double max_cos = 0, ww_all = 0, gg_all = 0, gw_all = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const double wn = std::sqrt(ww[i]), gn = std::sqrt(gg[i]);
    max_cos = std::max(max_cos, std::abs(gw[i] / (std::max(wn, eps) * std::max(gn, eps))));
    ww_all += ww[i]; gg_all += gg[i]; gw_all += gw[i];
  }
  if (max_cos < delta / std::sqrt(static_cast<double>(cols))) return Projection::kChannel;
  const double wn_all = std::sqrt(ww_all), gn_all = std::sqrt(gg_all);
  const bool layer = std::abs(gw_all / (std::max(wn_all, eps) * std::max(gn_all, eps))) <
                     delta / std::sqrt(static_cast<double>(rows * cols));
  return layer ? Projection::kLayer : Projection::kNone;
}

template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T s = 0;
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

// One projected update of a tensor seen as [rows, cols]:
//   moments(i)            update row i's optimizer state;
//   direction(i, d)       write row i's update direction into d;
//   apply(i, d, c, proj)  p_i <- p_i factor + (d - c p_i) step   (c = 0: no projection).
// The test reads w and g once; without projection or with the per-row (channel) projection the update is
// then a single pass (each row's coefficient needs only its own <w, d>); the per-tensor (layer) projection
// needs the sum of <w, d> over all rows first, so it takes a second pass that recomputes d.
template <typename T, typename Moments, typename Direction, typename Apply>
void projected_update(const T* p, const T* g, int64_t rows, int64_t cols, bool testable, double delta, double eps,
                      const Moments& moments, const Direction& direction, const Apply& apply) {
  Projection mode = Projection::kNone;
  std::vector<double> ww;
  if (testable) {
    std::vector<double> gg(rows), gw(rows);
    ww.resize(rows);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* pi = p + i * cols;
        const T* gi = g + i * cols;
        ww[i] = dot<T>(pi, pi, cols); gg[i] = dot<T>(gi, gi, cols); gw[i] = dot<T>(gi, pi, cols);
      }
    });
    mode = decide(ww, gg, gw, cols, delta, eps);
  }
  const bool projected = mode != Projection::kNone;
  if (mode != Projection::kLayer) {
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      std::vector<T> d(cols);
      for (int64_t i = begin; i < end; ++i) {
        moments(i);
        direction(i, d.data());
        T c = 0;
        if (mode == Projection::kChannel) {
          const double r = std::sqrt(ww[i]) + eps;
          c = static_cast<T>(static_cast<double>(dot<T>(p + i * cols, d.data(), cols)) / (r * r));
        }
        apply(i, d.data(), c, projected);
      }
    });
    return;
  }
  std::vector<double> wd(rows);
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<T> d(cols);
    for (int64_t i = begin; i < end; ++i) {
      moments(i);
      direction(i, d.data());
      wd[i] = dot<T>(p + i * cols, d.data(), cols);
    }
  });
  double ww_all = 0, wd_all = 0;
  for (int64_t i = 0; i < rows; ++i) { ww_all += ww[i]; wd_all += wd[i]; }
  const double r = std::sqrt(ww_all) + eps;
  const T c = static_cast<T>(wd_all / (r * r));
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<T> d(cols);
    for (int64_t i = begin; i < end; ++i) {
      direction(i, d.data());
      apply(i, d.data(), c, projected);
    }
  });
}

// d = m / (sqrt(v) / bc2s + eps), or Nesterov's (g + m b1/(1-b1)) (1-b1) / (...), as the eager path.
template <typename T, bool kNesterov>
inline void adam_direction(const T* __restrict__ g, const T* __restrict__ m, const T* __restrict__ v,
                           T* __restrict__ d, int64_t n, T w1, T nest_alpha, T bc2s, T eps) {
  const T inv_bc2s = T(1) / bc2s;  // a multiply instead of the eager path's division (within an ulp)
  for (int64_t k = 0; k < n; ++k) {
    const T denom = std::sqrt(v[k]) * inv_bc2s + eps;
    d[k] = kNesterov ? (g[k] + m[k] * nest_alpha) * w1 / denom : m[k] / denom;
  }
}

template <typename T>
inline void adam_moments(const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, int64_t n, T w1, T b2,
                         T w2) {
  for (int64_t k = 0; k < n; ++k) {
    m[k] = m[k] + w1 * (g[k] - m[k]);
    v[k] = v[k] * b2 + g[k] * g[k] * w2;
  }
}

// p <- p factor + (d - c p) step   (the projected update; c = 0 where nothing is projected)
template <typename T>
inline void apply_update(T* __restrict__ p, const T* __restrict__ d, int64_t n, T c, T factor, T step) {
  for (int64_t k = 0; k < n; ++k) p[k] = p[k] * factor + (d[k] - p[k] * c) * step;
}

template <typename T, bool kNesterov>
void adamp_tensor(at::Tensor& p_t, const at::Tensor& g_t, at::Tensor& m_t, at::Tensor& v_t, double lr, double beta1,
                  double beta2, double eps, double weight_decay, double delta, double wd_ratio, double bc1,
                  double bc2_sqrt) {
  auto [rows, cols] = rows_cols(p_t);
  T* p = p_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  T* m = m_t.data_ptr<T>();
  T* v = v_t.data_ptr<T>();
  const T w1 = 1 - beta1, b2 = beta2, w2 = 1 - beta2, bc2s = bc2_sqrt, e = eps, nest_alpha = beta1 / (1 - beta1);
  const T step = -lr / bc1;
  const T plain = weight_decay > 0 ? 1 - lr * weight_decay : 1.0;
  const T reduced = weight_decay > 0 ? 1 - lr * weight_decay * wd_ratio : 1.0;
  projected_update<T>(p, g, rows, cols, p_t.dim() >= 2, delta, eps,
      [&](int64_t i) { adam_moments<T>(g + i * cols, m + i * cols, v + i * cols, cols, w1, b2, w2); },
      [&](int64_t i, T* d) {
        adam_direction<T, kNesterov>(g + i * cols, m + i * cols, v + i * cols, d, cols, w1, nest_alpha, bc2s, e);
      },
      [&](int64_t i, const T* d, T c, bool projected) {
        apply_update<T>(p + i * cols, d, cols, c, projected ? reduced : plain, step);
      });
}

template <typename T, bool kNesterov>
void sgdp_tensor(at::Tensor& p_t, const at::Tensor& g_t, at::Tensor& buf_t, double lr, double momentum,
                 double dampening, double weight_decay, double eps, double delta, double wd_ratio) {
  auto [rows, cols] = rows_cols(p_t);
  T* p = p_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  T* buf = buf_t.data_ptr<T>();
  const T mu = momentum, damp = 1 - dampening, neg_lr = -lr;
  const T plain = weight_decay > 0 ? 1 - lr * weight_decay / (1 - momentum) : 1.0;
  const T reduced = weight_decay > 0 ? 1 - lr * weight_decay * wd_ratio / (1 - momentum) : 1.0;
  projected_update<T>(p, g, rows, cols, p_t.dim() >= 2, delta, eps,
      [&](int64_t i) {
        T* __restrict__ bi = buf + i * cols;
        const T* __restrict__ gi = g + i * cols;
        for (int64_t k = 0; k < cols; ++k) bi[k] = bi[k] * mu + gi[k] * damp;
      },
      [&](int64_t i, T* __restrict__ d) {  // d = g + mu buf (Nesterov) or buf itself
        const T* __restrict__ gi = g + i * cols;
        const T* __restrict__ bi = buf + i * cols;
        for (int64_t k = 0; k < cols; ++k) d[k] = kNesterov ? gi[k] + mu * bi[k] : bi[k];
      },
      [&](int64_t i, const T* __restrict__ d, T c, bool projected) {
        T* __restrict__ pi = p + i * cols;
        T* __restrict__ bi = buf + i * cols;
        const T factor = projected ? reduced : plain;
        for (int64_t k = 0; k < cols; ++k) {
          const T dk = d[k] - pi[k] * c;
          if (!kNesterov) bi[k] = dk;  // as the reference: without Nesterov the buffer itself is projected
          pi[k] = pi[k] * factor + dk * neg_lr;
        }
      });
}

enum EpsMode { kV3 = 0, kV2 = 1, kMax = 2, kPow2p = 3 };

double adaptive_eps(double rms_g, double eps, double eps2, double power, int mode) {
  switch (mode) {
    case kV3: return eps * std::min(rms_g, 1.0);
    case kV2: return std::min(eps2 * rms_g, eps);
    case kMax: return eps * std::max(rms_g, 1.0);
    default: {
      const double scaled = eps2 * rms_g;
      return (rms_g > 0 && scaled < eps) ? std::pow(scaled, 2 * power) : std::pow(eps, 2 * power);
    }
  }
}

// Runs body(begin, end, partial) over chunks of [0, n) in parallel; returns the chunks' partial sums.
template <int kSums, typename Body>
std::array<double, kSums> chunked_sums(int64_t n, const Body& body) {
  const int64_t chunks = std::max<int64_t>(1, (n + kGrainElements - 1) / kGrainElements);
  std::vector<std::array<double, kSums>> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      partial[c] = body(c * kGrainElements, std::min(n, (c + 1) * kGrainElements));
    }
  });
  std::array<double, kSums> total{};
  for (const auto& part : partial)
    for (int j = 0; j < kSums; ++j) total[j] += part[j];
  return total;
}

// D = max(f^p + eps_t, floor)
template <typename T, bool kSqrt>
inline T fisher_denominator(T f, T power, T eps_t, T floor_d) {
  const T root = kSqrt ? std::sqrt(f) : std::pow(f, power);
  return std::max(root + eps_t, floor_d);
}

template <typename T, bool kSqrt, bool kDecay, bool kMask>
inline std::array<double, 3> fadam_pass1(const T* __restrict__ w, const T* __restrict__ g, T* __restrict__ f,
                                         int64_t n, T b2, T w2, T pw, T eps_t, T floor_d) {
  T s_g = 0, s_w = 0, s_live = 0;
  for (int64_t k = 0; k < n; ++k) {
    const T fk = f[k] * b2 + g[k] * g[k] * w2;
    f[k] = fk;
    const T inv_d = T(1) / fisher_denominator<T, kSqrt>(fk, pw, eps_t, floor_d);
    const T gb = g[k] * inv_d;
    s_g += gb * gb;
    if (kDecay) {
      const bool dead = kMask && fk == 0;
      const T wb = dead ? T(0) : w[k] * inv_d;
      s_w += wb * wb;
      s_live += dead ? T(0) : T(1);
    }
  }
  return {static_cast<double>(s_g), static_cast<double>(s_w), static_cast<double>(s_live)};
}

template <typename T, bool kSqrt, bool kDecay, bool kMask>
inline void fadam_pass2(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, const T* __restrict__ f,
                        int64_t n, T w1, T neg_lr, T neg_lr_wd, T g_div, T w_div, T pw, T eps_t, T floor_d) {
  // reciprocals instead of the eager path's divisions: within an ulp, and divisions are the bottleneck
  const T inv_g_div = T(1) / g_div, inv_w_div = T(1) / w_div;
  for (int64_t k = 0; k < n; ++k) {
    const T inv_d = T(1) / fisher_denominator<T, kSqrt>(f[k], pw, eps_t, floor_d);
    const T mk = m[k] + w1 * (g[k] * inv_d * inv_g_div - m[k]);
    m[k] = mk;
    T wk = w[k];
    if (kDecay) {
      const T wb = (kMask && f[k] == 0) ? T(0) : wk * inv_d * inv_w_div;
      wk = wk + wb * neg_lr_wd;
    }
    w[k] = wk + mk * neg_lr;
  }
}

template <typename T, bool kSqrt, bool kDecay, bool kMask>
void fadam_tensor(at::Tensor& w_t, const at::Tensor& g_t, at::Tensor& m_t, at::Tensor& f_t, double lr, double beta1,
                  double beta2_hat, double eps, double weight_decay, double clip, double power, int eps_mode,
                  double eps2, double min_denominator) {
  const int64_t n = w_t.numel();
  T* __restrict__ w = w_t.data_ptr<T>();
  const T* __restrict__ g = g_t.data_ptr<T>();
  T* __restrict__ m = m_t.data_ptr<T>();
  T* __restrict__ f = f_t.data_ptr<T>();
  const double sqrt_n = std::sqrt(static_cast<double>(n));
  // pass 0: RMS of the gradient, for the adaptive epsilon
  const auto g_sq = chunked_sums<1>(n, [&](int64_t a, int64_t b) {
    T s = 0;
    for (int64_t k = a; k < b; ++k) s += g[k] * g[k];
    return std::array<double, 1>{static_cast<double>(s)};
  });
  const T eps_t = adaptive_eps(std::sqrt(g_sq[0]) / sqrt_n, eps, eps2, power, eps_mode);
  const T b2 = beta2_hat, w2 = 1 - beta2_hat, pw = power, floor_d = min_denominator;
  // pass 1: Fisher update; sums of squares of g/D and of w/D (live coordinates only under kMask)
  const auto sums = chunked_sums<3>(n, [&](int64_t a, int64_t b) {
    return fadam_pass1<T, kSqrt, kDecay, kMask>(w + a, g + a, f + a, b - a, b2, w2, pw, eps_t, floor_d);
  });
  const T g_div = std::max(static_cast<T>(std::sqrt(sums[0]) / sqrt_n) / static_cast<T>(clip), T(1));
  const double w_count = kMask ? std::max(sums[2], 1.0) : static_cast<double>(n);
  const T w_div = std::max(static_cast<T>(std::sqrt(sums[1]) / std::sqrt(w_count)) / static_cast<T>(clip), T(1));
  // pass 2: momentum of the clipped natural gradient, decay term, update (in the eager path's order)
  at::parallel_for(0, n, kGrainElements, [&](int64_t a, int64_t b) {
    fadam_pass2<T, kSqrt, kDecay, kMask>(w + a, g + a, m + a, f + a, b - a, 1 - beta1, -lr, -lr * weight_decay,
                                         g_div, w_div, pw, eps_t, floor_d);
  });
}

template <typename T>
using FAdamFn = void (*)(at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, double, double, double, double,
                         double, double, double, int, double, double);

template <typename T>
FAdamFn<T> fadam_variant(bool sqrt_power, bool decay, bool mask) {
  if (sqrt_power) {
    if (!decay) return fadam_tensor<T, true, false, false>;
    return mask ? fadam_tensor<T, true, true, true> : fadam_tensor<T, true, true, false>;
  }
  if (!decay) return fadam_tensor<T, false, false, false>;
  return mask ? fadam_tensor<T, false, true, true> : fadam_tensor<T, false, true, false>;
}

// FAdam on a flat ZeRO partition: the per-tensor kernel's passes run per segment (a piece of one parameter;
// segs is [S, 3] int64: start, length, parameter — parameter n_params marks padding), with the per-parameter
// quantities that depend on the whole tensor (the epsilon, the two clip divisors) computed by the caller from
// statistics summed over the ranks between the passes.
template <typename T>
at::Tensor fadam_shard_gsq_impl(const at::Tensor& g_t, const at::Tensor& segs, int64_t n_params) {
  const T* __restrict__ g = g_t.data_ptr<T>();
  const int64_t* sg = segs.data_ptr<int64_t>();
  at::Tensor out = at::zeros({n_params}, g_t.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < segs.size(0); ++i) {
    const int64_t start = sg[3 * i], length = sg[3 * i + 1], param = sg[3 * i + 2];
    if (param >= n_params || length == 0) continue;
    const auto sums = chunked_sums<1>(length, [&](int64_t a, int64_t b) {
      T s = 0;
      for (int64_t k = start + a; k < start + b; ++k) s += g[k] * g[k];
      return std::array<double, 1>{static_cast<double>(s)};
    });
    o[param] += sums[0];
  }
  return out;
}

template <typename T, bool kSqrt, bool kDecay, bool kMask>
at::Tensor fadam_shard_pass1_impl(at::Tensor& w_t, const at::Tensor& g_t, at::Tensor& f_t, const at::Tensor& segs,
                                  const at::Tensor& eps_pp, int64_t n_params, double beta2_hat, double power,
                                  double min_denominator) {
  const T* w = w_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  T* f = f_t.data_ptr<T>();
  const int64_t* sg = segs.data_ptr<int64_t>();
  const double* eps = eps_pp.data_ptr<double>();
  at::Tensor out = at::zeros({3, n_params}, g_t.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const T b2 = beta2_hat, w2 = 1 - beta2_hat, pw = power, floor_d = min_denominator;
  for (int64_t i = 0; i < segs.size(0); ++i) {
    const int64_t start = sg[3 * i], length = sg[3 * i + 1], param = sg[3 * i + 2];
    if (length == 0) continue;
    const T eps_t = static_cast<T>(eps[param]);
    const auto sums = chunked_sums<3>(length, [&](int64_t a, int64_t b) {
      return fadam_pass1<T, kSqrt, kDecay, kMask>(w + start + a, g + start + a, f + start + a, b - a, b2, w2, pw,
                                                  eps_t, floor_d);
    });
    if (param < n_params)
      for (int j = 0; j < 3; ++j) o[j * n_params + param] += sums[j];
  }
  return out;
}

template <typename T, bool kSqrt, bool kDecay, bool kMask>
void fadam_shard_pass2_impl(at::Tensor& w_t, const at::Tensor& g_t, at::Tensor& m_t, const at::Tensor& f_t,
                            const at::Tensor& segs, const at::Tensor& eps_pp, const at::Tensor& g_div_pp,
                            const at::Tensor& w_div_pp, double beta1, double lr, double weight_decay, double power,
                            double min_denominator) {
  T* w = w_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  T* m = m_t.data_ptr<T>();
  const T* f = f_t.data_ptr<T>();
  const int64_t* sg = segs.data_ptr<int64_t>();
  const double* eps = eps_pp.data_ptr<double>();
  const double* g_div = g_div_pp.data_ptr<double>();
  const double* w_div = w_div_pp.data_ptr<double>();
  for (int64_t i = 0; i < segs.size(0); ++i) {
    const int64_t start = sg[3 * i], length = sg[3 * i + 1], param = sg[3 * i + 2];
    if (length == 0) continue;
    at::parallel_for(0, length, kGrainElements, [&](int64_t a, int64_t b) {
      fadam_pass2<T, kSqrt, kDecay, kMask>(w + start + a, g + start + a, m + start + a, f + start + a, b - a,
                                           1 - beta1, -lr, -lr * weight_decay, static_cast<T>(g_div[param]),
                                           static_cast<T>(w_div[param]), static_cast<T>(power),
                                           static_cast<T>(eps[param]), static_cast<T>(min_denominator));
    });
  }
}

void check(const std::vector<at::Tensor>& ts, const char* what) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "fused ", what, ": contiguous CPU tensors only");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fused ", what,
                ": float32/float64 only");
  }
}

}  // namespace

void adamp_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
            std::vector<at::Tensor> exp_avg_sqs, std::vector<double> bias_corrections1,
            std::vector<double> bias_corrections2_sqrt, double lr, double beta1, double beta2, double eps,
            double weight_decay, double delta, double wd_ratio, bool nesterov) {
  check(params, "AdamP"); check(grads, "AdamP"); check(exp_avgs, "AdamP"); check(exp_avg_sqs, "AdamP");
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "adamp_", [&] {
      auto fn = nesterov ? adamp_tensor<scalar_t, true> : adamp_tensor<scalar_t, false>;
      fn(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], lr, beta1, beta2, eps, weight_decay, delta, wd_ratio,
         bias_corrections1[i], bias_corrections2_sqrt[i]);
    });
  }
}

void sgdp_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> bufs, double lr,
           double momentum, double dampening, double weight_decay, bool nesterov, double eps, double delta,
           double wd_ratio) {
  check(params, "SGDP"); check(grads, "SGDP"); check(bufs, "SGDP");
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "sgdp_", [&] {
      auto fn = nesterov ? sgdp_tensor<scalar_t, true> : sgdp_tensor<scalar_t, false>;
      fn(params[i], grads[i], bufs[i], lr, momentum, dampening, weight_decay, eps, delta, wd_ratio);
    });
  }
}

void fadam_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> momenta,
            std::vector<at::Tensor> fims, std::vector<double> beta2_hats, double lr, double beta1, double eps,
            double weight_decay, double clip, double power, int64_t eps_mode, double eps2, double min_denominator,
            bool mask_dead) {
  check(params, "FAdam"); check(grads, "FAdam"); check(momenta, "FAdam"); check(fims, "FAdam");
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "fadam_", [&] {
      auto fn = fadam_variant<scalar_t>(power == 0.5, weight_decay > 0, mask_dead);
      fn(params[i], grads[i], momenta[i], fims[i], lr, beta1, beta2_hats[i], eps, weight_decay, clip, power,
         static_cast<int>(eps_mode), eps2, min_denominator);
    });
  }
}

at::Tensor fadam_shard_gsq(const at::Tensor& g, const at::Tensor& segs, int64_t n_params) {
  check({g}, "FAdam (ZeRO partition)");
  return g.scalar_type() == at::kFloat ? fadam_shard_gsq_impl<float>(g, segs, n_params)
                                       : fadam_shard_gsq_impl<double>(g, segs, n_params);
}

#define LIGHTNING_EXT_FADAM_VARIANT(FN, T, SQRT, DECAY, MASK, ...)                                  \
  do {                                                                                              \
    if (SQRT) {                                                                                     \
      if (!DECAY) return FN<T, true, false, false>(__VA_ARGS__);                                    \
      return MASK ? FN<T, true, true, true>(__VA_ARGS__) : FN<T, true, true, false>(__VA_ARGS__);   \
    }                                                                                               \
    if (!DECAY) return FN<T, false, false, false>(__VA_ARGS__);                                     \
    return MASK ? FN<T, false, true, true>(__VA_ARGS__) : FN<T, false, true, false>(__VA_ARGS__);   \
  } while (0)

at::Tensor fadam_shard_pass1_(at::Tensor w, at::Tensor g, at::Tensor f, at::Tensor segs, at::Tensor eps_pp,
                              int64_t n_params, double beta2_hat, double power, double min_denominator, bool decay,
                              bool mask) {
  check({w, g, f}, "FAdam (ZeRO partition)");
  const bool sqrt_power = power == 0.5;
  if (w.scalar_type() == at::kFloat)
    LIGHTNING_EXT_FADAM_VARIANT(fadam_shard_pass1_impl, float, sqrt_power, decay, mask, w, g, f, segs, eps_pp,
                                n_params, beta2_hat, power, min_denominator);
  LIGHTNING_EXT_FADAM_VARIANT(fadam_shard_pass1_impl, double, sqrt_power, decay, mask, w, g, f, segs, eps_pp,
                              n_params, beta2_hat, power, min_denominator);
}

void fadam_shard_pass2_(at::Tensor w, at::Tensor g, at::Tensor m, at::Tensor f, at::Tensor segs, at::Tensor eps_pp,
                        at::Tensor g_div_pp, at::Tensor w_div_pp, double beta1, double lr, double weight_decay,
                        double power, double min_denominator, bool decay, bool mask) {
  check({w, g, m, f}, "FAdam (ZeRO partition)");
  const bool sqrt_power = power == 0.5;
  if (w.scalar_type() == at::kFloat)
    LIGHTNING_EXT_FADAM_VARIANT(fadam_shard_pass2_impl, float, sqrt_power, decay, mask, w, g, m, f, segs, eps_pp,
                                g_div_pp, w_div_pp, beta1, lr, weight_decay, power, min_denominator);
  LIGHTNING_EXT_FADAM_VARIANT(fadam_shard_pass2_impl, double, sqrt_power, decay, mask, w, g, m, f, segs, eps_pp,
                              g_div_pp, w_div_pp, beta1, lr, weight_decay, power, min_denominator);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adamp_", &adamp_, "fused AdamP step (CPU)");
  module.def("sgdp_", &sgdp_, "fused SGDP step (CPU)");
  module.def("fadam_", &fadam_, "fused FAdam step (CPU)");
  module.def("fadam_shard_gsq", &fadam_shard_gsq, "FAdam on a ZeRO partition: per-parameter sums of g^2");
  module.def("fadam_shard_pass1_", &fadam_shard_pass1_, "FAdam on a ZeRO partition: Fisher update, clip sums");
  module.def("fadam_shard_pass2_", &fadam_shard_pass2_, "FAdam on a ZeRO partition: momentum and weights");
}
