// Optimizer update rules with the exact semantics of torch.optim (single-tensor, non-fused path).
//
// The core knows no Python: hyperparameters arrive already validated by paramserver/optim.py, but
// validate() re-checks them so that a direct caller of the C++ API cannot corrupt state either.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace paramserver {

enum class OptimizerKind : int { kSGD = 0, kAdagrad = 1, kAdam = 2, kAdamW = 3 };

// Every hyperparameter of the four optimizers; fields an optimizer does not use are ignored.
// Defaults equal torch's defaults for SGD (lr has no default in torch; 1e-3 here).
struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kSGD;
  double lr = 1e-3;
  // SGD
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
  // Adagrad
  double lr_decay = 0.0;
  double initial_accumulator_value = 0.0;
  // Adam / AdamW
  double beta1 = 0.9;
  double beta2 = 0.999;
  bool amsgrad = false;
  // Adam's bias correction (torch always applies it). Off: the server update of adaptive
  // federated optimization (Reddi et al., ICLR 2021, FedAdam), theta -= lr * m / (sqrt(v) + eps).
  bool bias_correction = true;
  // shared
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool maximize = false;
};

// Throws std::invalid_argument naming the first bad hyperparameter.
void validate(const OptimizerConfig& config);

// Number of float32 state arrays ("slots") of the same length as the parameter that the optimizer
// keeps: SGD 0 (1 with momentum), Adagrad 1 (sum), Adam/AdamW 2 (exp_avg, exp_avg_sq; 3 with amsgrad).
int num_slots(const OptimizerConfig& config);

// Initial value of slot `slot` (Adagrad's sum starts at initial_accumulator_value, all else at 0).
float slot_initial_value(const OptimizerConfig& config, int slot);

// Human-readable name, e.g. "Adam".
std::string kind_name(OptimizerKind kind);

// One optimizer step on n contiguous elements.
//   param:  n values, updated in place.
//   grad:   n gradient values; read only (a decayed/negated copy is never written back).
//   slots:  num_slots(config) arrays of n values each, updated in place.
//   step:   the step count *after* this step (1 on the first update), as torch's state["step"].
// Not thread safe for overlapping spans; callers serialize per block/row. Never allocates.
void apply_step(const OptimizerConfig& config, float* param, const float* grad, float* const* slots,
                std::size_t n, std::int64_t step);

// The instruction set apply_step runs with on this CPU, chosen once at first use:
// "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2 + FMA) or "baseline". The FMA-capable levels round like
// torch's AVX2/AVX-512 kernels, the baseline like torch's default (non-FMA) kernels.
const char* kernel_isa();

// Switch the kernels to another instruction-set level, e.g. "baseline" to run the non-FMA path on
// an AVX-512 machine; for tests and benchmarks. Safe to call at any time (each update runs wholly
// on one level), but affects every table in the process. Throws std::invalid_argument for an
// unknown level or one the CPU does not support.
void set_kernel_isa(const std::string& name);

}  // namespace paramserver
