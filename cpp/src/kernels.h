// Element-wise optimizer kernels: plain loops over contiguous spans that the compiler vectorizes.
// Internal to the core; callers go through apply_step() in optimizer.h.
//
// Each kernel is compiled for several ISAs and picked on first use (x86-64-v4, x86-64-v3, baseline),
// so one wheel runs at full width on AVX-512 machines and still runs on a baseline x86-64 CPU. The
// operation order and fma use mirror torch's single-tensor ATen ops one for one (see kernels.cc),
// so results agree with torch to the last bit except where torch's sqrt is off by an ulp.
//
// All kernels are thread safe for disjoint spans and never allocate. Spans must not overlap.
#pragma once

#include <cstddef>

namespace paramserver::kernels {

// Per-step scalars, already rounded to float exactly as torch rounds its Python-float arguments.
// `sign` is -1 with maximize, else 1. A weight_decay of 0 skips the decay term altogether, as torch
// does (so an infinite parameter does not turn the gradient into NaN).
struct SgdParams {
  float lr, momentum, one_minus_dampening, weight_decay, sign;
};
// clr is lr / (1 + (step - 1) * lr_decay), computed in double.
struct AdagradParams {
  float clr, eps, weight_decay, sign;
};
// beta1_complement is 1 - beta1 (the lerp weight); step_size is lr / (1 - beta1^t);
// bias_correction2_sqrt is (1 - beta2^t)^0.5; all computed in double, then rounded.
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

// The instruction set the kernels run with on this CPU: "x86-64-v4", "x86-64-v3" or "baseline".
const char* isa_name();
// Use the named level instead of the detected one (for testing every code path on one machine).
// Throws std::invalid_argument for an unknown name or a level this CPU lacks.
void select_isa(const char* name);

}  // namespace paramserver::kernels
