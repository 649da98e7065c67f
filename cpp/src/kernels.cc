#include "kernels.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

// Rounding model. torch's single-tensor optimizers are chains of ATen ops, and each op rounds in
// a fixed way that we reproduce operation for operation (checked against torch 2.13 on AVX-512 and
// AVX2 CPUs, element by element):
//   a.add(b, alpha=s)          -> fma(b, s, a)            (ATen's vectorized add is an fmadd)
//   a.addcmul_(b, c, value=s)  -> fma(s * b, c, a)
//   a.addcdiv_(b, c, value=s)  -> a + (s * b) / c         (no fma)
//   a.lerp_(b, w), |w| < 0.5   -> fma(w, b - a, a);  else fma(w - 1, b - a, b)
//   a.mul_(s), a / s, a + s    -> one float operation each, the scalar rounded to float first
// ATen's fmadd is a real FMA only where the CPU has one (AVX2/AVX-512 builds); its baseline build
// multiplies and adds. The kernels do the same: the FMA-capable clones call fma explicitly and the
// baseline clone multiplies and adds, and this file is compiled with -ffp-contract=off so the
// compiler never fuses anything on its own. The one remaining difference is sqrt: ours is IEEE
// (correctly rounded), torch's may differ by one ulp on some elements.

// Run-time ISA dispatch. Each kernel body is an always-inline template instantiated inside three
// functions compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and the baseline ISA; the first
// call picks the widest one the CPU supports. Manual rather than target_clones because the clones
// must differ in more than the ISA: the baseline one must not use fma (which it would emulate in
// software, slowly) while the others must.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PS_X86_DISPATCH 1
#define PS_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define PS_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define PS_X86_DISPATCH 0
#endif

#define PS_INLINE inline __attribute__((always_inline))

namespace paramserver::kernels {

namespace {

template <bool kFma>
PS_INLINE float madd(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

enum class Isa { kBaseline, kV3, kV4 };

Isa detect_isa() {
#if PS_X86_DISPATCH
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return v4 ? Isa::kV4 : v3 ? Isa::kV3 : Isa::kBaseline;
#else
  return Isa::kBaseline;
#endif
}

const Isa kDetected = detect_isa();
// The level in use: the detected one unless lowered by select_isa (tests of the other code paths).
std::atomic<Isa> g_isa{kDetected};

Isa isa() { return g_isa.load(std::memory_order_relaxed); }

const char* name_of(Isa level) {
  switch (level) {
    case Isa::kV4:
      return "x86-64-v4";
    case Isa::kV3:
      return "x86-64-v3";
    case Isa::kBaseline:
      break;
  }
  return "baseline";
}

#if PS_X86_DISPATCH
template <class K, class... A>
PS_TARGET_V4 void run_v4(A... a) {
  K::template run<true>(a...);
}
template <class K, class... A>
PS_TARGET_V3 void run_v3(A... a) {
  K::template run<true>(a...);
}
#endif
template <class K, class... A>
void run_baseline(A... a) {
  K::template run<false>(a...);
}

// Calls K::run<fma>(a...) compiled for the CPU's widest supported ISA.
template <class K, class... A>
void dispatch(A... a) {
#if PS_X86_DISPATCH
  switch (isa()) {
    case Isa::kV4:
      return run_v4<K>(a...);
    case Isa::kV3:
      return run_v3<K>(a...);
    case Isa::kBaseline:
      break;
  }
#endif
  run_baseline<K>(a...);
}

// Plain SGD: g = sign*grad [+ wd*param]; param += -lr * g.
template <bool kDecay>
struct SgdPlain {
  template <bool kFma>
  static PS_INLINE void run(float* __restrict param, const float* __restrict grad, std::size_t n,
                            SgdParams p) {
    const float neg_lr = -p.lr, wd = p.weight_decay, s = p.sign;
#pragma GCC ivdep
    for (std::size_t i = 0; i < n; ++i) {
      const float x = param[i];
      float g = s * grad[i];
      if constexpr (kDecay) g = madd<kFma>(x, wd, g);
      param[i] = madd<kFma>(g, neg_lr, x);
    }
  }
};

// SGD with momentum. On the first step torch clones the (decayed) gradient into the buffer, with
// no dampening; afterwards buf = buf*momentum + (1-dampening)*g. Nesterov steps along g + mom*buf.
template <bool kDecay, bool kFirst, bool kNesterov>
struct SgdMomentum {
  template <bool kFma>
  static PS_INLINE void run(float* __restrict param, const float* __restrict grad,
                            float* __restrict buf, std::size_t n, SgdParams p) {
    const float neg_lr = -p.lr, wd = p.weight_decay, s = p.sign, mom = p.momentum,
                damp = p.one_minus_dampening;
#pragma GCC ivdep
    for (std::size_t i = 0; i < n; ++i) {
      const float x = param[i];
      float g = s * grad[i];
      if constexpr (kDecay) g = madd<kFma>(x, wd, g);
      float b;
      if constexpr (kFirst) {
        b = g;
      } else {
        b = madd<kFma>(g, damp, buf[i] * mom);
      }
      buf[i] = b;
      const float step = kNesterov ? madd<kFma>(b, mom, g) : b;
      param[i] = madd<kFma>(step, neg_lr, x);
    }
  }
};

// Adagrad: sum += g*g; param += (-clr * g) / (sqrt(sum) + eps).
template <bool kDecay>
struct Adagrad {
  template <bool kFma>
  static PS_INLINE void run(float* __restrict param, const float* __restrict grad,
                            float* __restrict sum, std::size_t n, AdagradParams p) {
    const float neg_clr = -p.clr, eps = p.eps, wd = p.weight_decay, s = p.sign;
#pragma GCC ivdep
    for (std::size_t i = 0; i < n; ++i) {
      const float x = param[i];
      float g = s * grad[i];
      if constexpr (kDecay) g = madd<kFma>(x, wd, g);
      const float acc = madd<kFma>(g, g, sum[i]);
      sum[i] = acc;
      param[i] = x + (neg_clr * g) / (std::sqrt(acc) + eps);
    }
  }
};

enum class Decay { kNone, kL2, kDecoupled };

// Adam/AdamW. Each variant is its own loop (no per-element branch on amsgrad, decay mode or lerp
// formula), so every one vectorizes as a straight line of loads, arithmetic and stores.
template <Decay kDecay, bool kAmsgrad, bool kLerpSmall>
struct Adam {
  template <bool kFma>
  static PS_INLINE void run(float* __restrict param, const float* __restrict grad,
                            float* __restrict exp_avg, float* __restrict exp_avg_sq,
                            float* __restrict max_exp_avg_sq, std::size_t n, AdamParams p) {
    const float w = p.beta1_complement, w_minus_one = p.beta1_complement - 1.0f, b2 = p.beta2,
                b2c = p.beta2_complement, neg_step = -p.step_size, bc2 = p.bias_correction2_sqrt,
                eps = p.eps, s = p.sign, l2 = p.l2, decay = p.decoupled_decay;
#pragma GCC ivdep
    for (std::size_t i = 0; i < n; ++i) {
      float x = param[i];
      if constexpr (kDecay == Decay::kDecoupled) x = x * decay;
      float g = s * grad[i];
      if constexpr (kDecay == Decay::kL2) g = madd<kFma>(x, l2, g);
      const float m0 = exp_avg[i];
      const float d = g - m0;
      const float m = kLerpSmall ? madd<kFma>(w, d, m0) : madd<kFma>(w_minus_one, d, g);
      const float v = madd<kFma>(b2c * g, g, exp_avg_sq[i] * b2);
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      float vhat = v;
      if constexpr (kAmsgrad) {
        // torch.maximum propagates NaN; here a NaN v wins through the comparison, and a NaN
        // maximum can only have come from a v that is still NaN (v never recovers from NaN).
        const float prev = max_exp_avg_sq[i];
        vhat = prev > v ? prev : v;
        max_exp_avg_sq[i] = vhat;
      }
      const float denom = std::sqrt(vhat) / bc2 + eps;
      param[i] = x + (neg_step * m) / denom;
    }
  }
};

struct AddInto {
  template <bool kFma>
  static PS_INLINE void run(float* __restrict out, const float* __restrict in, std::size_t n) {
#pragma GCC ivdep
    for (std::size_t i = 0; i < n; ++i) out[i] += in[i];
  }
};

template <Decay kDecay, bool kAmsgrad>
void adam_lerp(float* param, const float* grad, float* m, float* v, float* vmax, std::size_t n,
               const AdamParams& p) {
  // ATen's lerp switches formula on |weight| < 0.5 for accuracy near each end.
  if (p.beta1_complement < 0.5f) {
    dispatch<Adam<kDecay, kAmsgrad, true>>(param, grad, m, v, vmax, n, p);
  } else {
    dispatch<Adam<kDecay, kAmsgrad, false>>(param, grad, m, v, vmax, n, p);
  }
}

template <Decay kDecay>
void adam_ams(float* param, const float* grad, float* m, float* v, float* vmax, std::size_t n,
              const AdamParams& p) {
  if (vmax != nullptr) {
    adam_lerp<kDecay, true>(param, grad, m, v, vmax, n, p);
  } else {
    adam_lerp<kDecay, false>(param, grad, m, v, vmax, n, p);
  }
}

template <bool kDecay, bool kFirst>
void sgd_momentum_nesterov(float* param, const float* grad, float* buf, std::size_t n,
                           const SgdParams& p, bool nesterov) {
  if (nesterov) {
    dispatch<SgdMomentum<kDecay, kFirst, true>>(param, grad, buf, n, p);
  } else {
    dispatch<SgdMomentum<kDecay, kFirst, false>>(param, grad, buf, n, p);
  }
}

template <bool kFirst>
void sgd_momentum_any(float* param, const float* grad, float* buf, std::size_t n,
                      const SgdParams& p, bool nesterov) {
  // torch adds the weight-decay term only when weight_decay != 0 (0 * inf would be NaN).
  if (p.weight_decay != 0.0f) {
    sgd_momentum_nesterov<true, kFirst>(param, grad, buf, n, p, nesterov);
  } else {
    sgd_momentum_nesterov<false, kFirst>(param, grad, buf, n, p, nesterov);
  }
}

}  // namespace

void sgd_plain(float* param, const float* grad, std::size_t n, const SgdParams& p) {
  if (p.weight_decay != 0.0f) {
    dispatch<SgdPlain<true>>(param, grad, n, p);
  } else {
    dispatch<SgdPlain<false>>(param, grad, n, p);
  }
}

void sgd_momentum_first(float* param, const float* grad, float* buf, std::size_t n,
                        const SgdParams& p, bool nesterov) {
  sgd_momentum_any<true>(param, grad, buf, n, p, nesterov);
}

void sgd_momentum(float* param, const float* grad, float* buf, std::size_t n, const SgdParams& p,
                  bool nesterov) {
  sgd_momentum_any<false>(param, grad, buf, n, p, nesterov);
}

void adagrad(float* param, const float* grad, float* sum, std::size_t n, const AdagradParams& p) {
  if (p.weight_decay != 0.0f) {
    dispatch<Adagrad<true>>(param, grad, sum, n, p);
  } else {
    dispatch<Adagrad<false>>(param, grad, sum, n, p);
  }
}

void adam(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, float* max_exp_avg_sq,
          std::size_t n, const AdamParams& p) {
  if (p.decoupled_decay != 1.0f) {
    adam_ams<Decay::kDecoupled>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, p);
  } else if (p.l2 != 0.0f) {
    adam_ams<Decay::kL2>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, p);
  } else {
    adam_ams<Decay::kNone>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, p);
  }
}

void add_into(float* out, const float* in, std::size_t n) { dispatch<AddInto>(out, in, n); }

const char* isa_name() { return name_of(isa()); }

void select_isa(const char* name) {
  for (Isa level : {Isa::kBaseline, Isa::kV3, Isa::kV4}) {
    if (std::strcmp(name, name_of(level)) != 0) continue;
    if (static_cast<int>(level) > static_cast<int>(kDetected)) {
      throw std::invalid_argument(std::string("this CPU does not support ") + name +
                                  " (best: " + name_of(kDetected) + ")");
    }
    g_isa.store(level, std::memory_order_relaxed);
    return;
  }
  throw std::invalid_argument(std::string("unknown instruction set '") + name +
                              "' (expected x86-64-v4, x86-64-v3 or baseline)");
}

}  // namespace paramserver::kernels
