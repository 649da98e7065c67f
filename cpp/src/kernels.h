// Element-wise optimizer kernels: plain loops over contiguous spans that the compiler vectorizes.
// Internal to the core; callers go through apply_step() in optimizer.h.
//
// Each kernel is compiled for several ISAs and picked at load time (GCC/Clang target_clones on
// x86-64), so one wheel runs at full width on AVX-512 machines and still runs on a baseline
// x86-64 CPU. The expression order mirrors torch's tensor ops so results agree to float rounding.
#pragma once

#include <cstddef>

namespace paramserver::kernels {

struct SgdParams {
  float lr, momentum, one_minus_dampening, weight_decay, sign;
};
struct AdagradParams {
  float clr, eps, weight_decay, sign;
};
struct AdamParams {
  float beta1_complement, beta2, beta2_complement, step_size, bias_correction2_sqrt, eps, sign;
  float l2;               // Adam's L2 weight decay added to the gradient (0 for AdamW)
  float decoupled_decay;  // AdamW's 1 - lr * weight_decay applied to the parameter (1 for Adam)
};

void sgd_plain(float* param, const float* grad, std::size_t n, const SgdParams& p);
void sgd_momentum_first(float* param, const float* grad, float* buf, std::size_t n,
                        const SgdParams& p, bool nesterov);
void sgd_momentum(float* param, const float* grad, float* buf, std::size_t n, const SgdParams& p,
                  bool nesterov);
void adagrad(float* param, const float* grad, float* sum, std::size_t n, const AdagradParams& p);
// max_exp_avg_sq is null unless amsgrad.
void adam(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, float* max_exp_avg_sq,
          std::size_t n, const AdamParams& p);

// Element-wise sum: out[i] += in[i]. Used to merge duplicate embedding ids and sync gradients.
void add_into(float* out, const float* in, std::size_t n);

}  // namespace paramserver::kernels
