#include "kernels.h"

#include <cmath>

// Run-time ISA dispatch: the loader resolves each function to its widest clone the CPU supports.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define PS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PS_MULTIVERSION
#endif

namespace paramserver::kernels {

PS_MULTIVERSION
void sgd_plain(float* __restrict param, const float* __restrict grad, std::size_t n,
               const SgdParams& p) {
  const float neg_lr = -p.lr, wd = p.weight_decay, s = p.sign;
  for (std::size_t i = 0; i < n; ++i) {
    const float g = s * grad[i] + wd * param[i];
    param[i] = param[i] + neg_lr * g;
  }
}

PS_MULTIVERSION
void sgd_momentum_first(float* __restrict param, const float* __restrict grad, float* __restrict buf,
                        std::size_t n, const SgdParams& p, bool nesterov) {
  // torch: the first step clones the gradient into the buffer; dampening is not applied.
  const float neg_lr = -p.lr, wd = p.weight_decay, s = p.sign, mom = p.momentum;
  if (nesterov) {
    for (std::size_t i = 0; i < n; ++i) {
      const float g = s * grad[i] + wd * param[i];
      buf[i] = g;
      param[i] = param[i] + neg_lr * (g + mom * g);
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const float g = s * grad[i] + wd * param[i];
      buf[i] = g;
      param[i] = param[i] + neg_lr * g;
    }
  }
}

PS_MULTIVERSION
void sgd_momentum(float* __restrict param, const float* __restrict grad, float* __restrict buf,
                  std::size_t n, const SgdParams& p, bool nesterov) {
  const float neg_lr = -p.lr, wd = p.weight_decay, s = p.sign, mom = p.momentum,
              damp = p.one_minus_dampening;
  if (nesterov) {
    for (std::size_t i = 0; i < n; ++i) {
      const float g = s * grad[i] + wd * param[i];
      const float b = buf[i] * mom + damp * g;
      buf[i] = b;
      param[i] = param[i] + neg_lr * (g + mom * b);
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const float g = s * grad[i] + wd * param[i];
      const float b = buf[i] * mom + damp * g;
      buf[i] = b;
      param[i] = param[i] + neg_lr * b;
    }
  }
}

PS_MULTIVERSION
void adagrad(float* __restrict param, const float* __restrict grad, float* __restrict sum,
             std::size_t n, const AdagradParams& p) {
  const float neg_clr = -p.clr, eps = p.eps, wd = p.weight_decay, s = p.sign;
  for (std::size_t i = 0; i < n; ++i) {
    const float g = s * grad[i] + wd * param[i];
    const float acc = sum[i] + g * g;
    sum[i] = acc;
    param[i] = param[i] + neg_clr * (g / (std::sqrt(acc) + eps));
  }
}

PS_MULTIVERSION
void adam(float* __restrict param, const float* __restrict grad, float* __restrict exp_avg,
          float* __restrict exp_avg_sq, float* __restrict max_exp_avg_sq, std::size_t n,
          const AdamParams& p) {
  const float w = p.beta1_complement, b2 = p.beta2, b2c = p.beta2_complement,
              neg_step = -p.step_size, bc2 = p.bias_correction2_sqrt, eps = p.eps, s = p.sign,
              l2 = p.l2, decay = p.decoupled_decay;
  // torch's lerp(m, g, w) switches formula at w = 0.5 for accuracy; mirror it outside the loop.
  const bool lerp_from_start = w < 0.5f;
  const float one_minus_w = 1.0f - w;
  for (std::size_t i = 0; i < n; ++i) {
    const float x = param[i] * decay;
    const float g = s * grad[i] + l2 * x;
    const float m0 = exp_avg[i];
    const float m = lerp_from_start ? m0 + w * (g - m0) : g - (g - m0) * one_minus_w;
    const float v = exp_avg_sq[i] * b2 + b2c * (g * g);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    float vhat = v;
    if (max_exp_avg_sq != nullptr) {
      vhat = max_exp_avg_sq[i] > v ? max_exp_avg_sq[i] : v;
      max_exp_avg_sq[i] = vhat;
    }
    const float denom = std::sqrt(vhat) / bc2 + eps;
    param[i] = x + neg_step * (m / denom);
  }
}

PS_MULTIVERSION
void add_into(float* __restrict out, const float* __restrict in, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] += in[i];
}

}  // namespace paramserver::kernels
