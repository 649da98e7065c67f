#include "paramserver/optimizer.h"

#include <cmath>
#include <stdexcept>

#include "kernels.h"

namespace paramserver {

namespace {

void require(bool ok, const char* name, double value, const char* rule) {
  if (!ok) {
    throw std::invalid_argument(std::string("invalid ") + name + " " + std::to_string(value) + ": " +
                                rule);
  }
}

}  // namespace

void validate(const OptimizerConfig& c) {
  require(std::isfinite(c.lr) && c.lr >= 0.0, "lr", c.lr, "must be finite and >= 0");
  require(std::isfinite(c.weight_decay) && c.weight_decay >= 0.0, "weight_decay", c.weight_decay,
          "must be finite and >= 0");
  switch (c.kind) {
    case OptimizerKind::kSGD:
      require(std::isfinite(c.momentum) && c.momentum >= 0.0, "momentum", c.momentum,
              "must be finite and >= 0");
      require(std::isfinite(c.dampening), "dampening", c.dampening, "must be finite");
      if (c.nesterov && (c.momentum <= 0.0 || c.dampening != 0.0)) {
        throw std::invalid_argument("nesterov momentum requires momentum > 0 and dampening == 0");
      }
      break;
    case OptimizerKind::kAdagrad:
      require(std::isfinite(c.lr_decay) && c.lr_decay >= 0.0, "lr_decay", c.lr_decay,
              "must be finite and >= 0");
      require(std::isfinite(c.initial_accumulator_value) && c.initial_accumulator_value >= 0.0,
              "initial_accumulator_value", c.initial_accumulator_value, "must be finite and >= 0");
      require(std::isfinite(c.eps) && c.eps >= 0.0, "eps", c.eps, "must be finite and >= 0");
      break;
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      require(std::isfinite(c.eps) && c.eps >= 0.0, "eps", c.eps, "must be finite and >= 0");
      require(c.beta1 >= 0.0 && c.beta1 < 1.0, "beta1", c.beta1, "must be in [0, 1)");
      require(c.beta2 >= 0.0 && c.beta2 < 1.0, "beta2", c.beta2, "must be in [0, 1)");
      break;
    default:
      throw std::invalid_argument("unknown optimizer kind " + std::to_string(static_cast<int>(c.kind)));
  }
}

int num_slots(const OptimizerConfig& c) {
  switch (c.kind) {
    case OptimizerKind::kSGD:
      return c.momentum != 0.0 ? 1 : 0;
    case OptimizerKind::kAdagrad:
      return 1;
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      return c.amsgrad ? 3 : 2;
  }
  return 0;
}

float slot_initial_value(const OptimizerConfig& c, int slot) {
  if (c.kind == OptimizerKind::kAdagrad && slot == 0) {
    return static_cast<float>(c.initial_accumulator_value);
  }
  return 0.0f;
}

std::string kind_name(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kSGD:
      return "SGD";
    case OptimizerKind::kAdagrad:
      return "Adagrad";
    case OptimizerKind::kAdam:
      return "Adam";
    case OptimizerKind::kAdamW:
      return "AdamW";
  }
  return "unknown";
}

void apply_step(const OptimizerConfig& c, float* param, const float* grad, float* const* slots,
                std::size_t n, std::int64_t step) {
  // Scalars are computed in double, as torch does for Python-float hyperparameters, then rounded
  // once to float: the kernels see exactly the constants torch's tensor ops see.
  const float sign = c.maximize ? -1.0f : 1.0f;
  switch (c.kind) {
    case OptimizerKind::kSGD: {
      kernels::SgdParams p;
      p.lr = static_cast<float>(c.lr);
      p.momentum = static_cast<float>(c.momentum);
      p.one_minus_dampening = static_cast<float>(1.0 - c.dampening);
      p.weight_decay = static_cast<float>(c.weight_decay);
      p.sign = sign;
      if (c.momentum == 0.0) {
        kernels::sgd_plain(param, grad, n, p);
      } else if (step == 1) {
        kernels::sgd_momentum_first(param, grad, slots[0], n, p, c.nesterov);
      } else {
        kernels::sgd_momentum(param, grad, slots[0], n, p, c.nesterov);
      }
      return;
    }
    case OptimizerKind::kAdagrad: {
      kernels::AdagradParams p;
      p.clr = static_cast<float>(c.lr / (1.0 + static_cast<double>(step - 1) * c.lr_decay));
      p.eps = static_cast<float>(c.eps);
      p.weight_decay = static_cast<float>(c.weight_decay);
      p.sign = sign;
      kernels::adagrad(param, grad, slots[0], n, p);
      return;
    }
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW: {
      const double bc1 = c.bias_correction ? 1.0 - std::pow(c.beta1, static_cast<double>(step)) : 1.0;
      const double bc2 = c.bias_correction ? 1.0 - std::pow(c.beta2, static_cast<double>(step)) : 1.0;
      kernels::AdamParams p;
      p.beta1_complement = static_cast<float>(1.0 - c.beta1);
      p.beta2 = static_cast<float>(c.beta2);
      p.beta2_complement = static_cast<float>(1.0 - c.beta2);
      p.step_size = static_cast<float>(c.lr / bc1);
      p.bias_correction2_sqrt = static_cast<float>(std::pow(bc2, 0.5));  // torch: bc2 ** 0.5
      p.eps = static_cast<float>(c.eps);
      p.sign = sign;
      if (c.kind == OptimizerKind::kAdam) {
        p.l2 = static_cast<float>(c.weight_decay);
        p.decoupled_decay = 1.0f;
      } else {
        p.l2 = 0.0f;
        p.decoupled_decay = static_cast<float>(1.0 - c.lr * c.weight_decay);
      }
      kernels::adam(param, grad, slots[0], slots[1], c.amsgrad ? slots[2] : nullptr, n, p);
      return;
    }
  }
}

const char* kernel_isa() { return kernels::isa_name(); }

void set_kernel_isa(const std::string& name) { kernels::select_isa(name.c_str()); }

}  // namespace paramserver
