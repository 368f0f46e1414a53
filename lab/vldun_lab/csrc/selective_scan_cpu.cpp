// Fused selective scan (Gu & Dao 2023, Eq. 2a-2b with the ZOH/Euler discretisation of Eq. 4) for CPU training.
//
// The PyTorch scan of VLDUNLib/ssm.py materialises (b, l, n, d) coefficients and states and is bound by memory
// traffic; here each position updates the (n, d) state in cache: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
// y_t = C_t h_t. Layout: u, delta, y (b, L, d); B, C (b, L, n); At = A transposed (n, d); all fp32, contiguous.
// The forward keeps the state at the start of every chunk of T positions; the backward recomputes one chunk's
// states from it and runs the reversed recurrence for the state gradient, G_t = C_t dy_t + A_bar_{t+1} G_{t+1}.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline int64_t position(int64_t s, int64_t length, bool reverse) { return reverse ? length - 1 - s : s; }

void forward_sequence(const float* __restrict u, const float* __restrict dt, const float* __restrict At,
                      const float* __restrict B, const float* __restrict C, float* __restrict y,
                      float* __restrict starts, int64_t L, int64_t d, int64_t n, bool reverse, int64_t T) {
  std::vector<float> state(n * d, 0.f), du(d);
  float* __restrict h = state.data();
  for (int64_t s = 0; s < L; ++s) {
    if (s % T == 0) std::copy(h, h + n * d, starts + (s / T) * n * d);
    const int64_t t = position(s, L, reverse);
    const float* __restrict ut = u + t * d;
    const float* __restrict dtt = dt + t * d;
    float* __restrict yt = y + t * d;
    for (int64_t j = 0; j < d; ++j) {
      du[j] = dtt[j] * ut[j];
      yt[j] = 0.f;
    }
    for (int64_t k = 0; k < n; ++k) {
      const float bk = B[t * n + k], ck = C[t * n + k];
      const float* __restrict Ak = At + k * d;
      float* __restrict hk = h + k * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        hk[j] = std::exp(dtt[j] * Ak[j]) * hk[j] + du[j] * bk;
        yt[j] += ck * hk[j];
      }
    }
  }
}

void backward_sequence(const float* __restrict u, const float* __restrict dt, const float* __restrict At,
                       const float* __restrict B, const float* __restrict C, const float* __restrict gy,
                       const float* __restrict starts, float* __restrict du_out, float* __restrict ddt,
                       float* __restrict dAt, float* __restrict dB, float* __restrict dC, int64_t L, int64_t d,
                       int64_t n, bool reverse, int64_t T) {
  const int64_t nd = n * d, chunks = (L + T - 1) / T;
  std::vector<float> states(T * nd), decays(T * nd), carry(nd, 0.f), gdu(d);
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t first = c * T, count = std::min(L, first + T) - first;
    const float* previous = starts + c * nd;
    for (int64_t i = 0; i < count; ++i) {  // recompute the chunk's decays and states
      const int64_t t = position(first + i, L, reverse);
      const float* __restrict ut = u + t * d;
      const float* __restrict dtt = dt + t * d;
      for (int64_t k = 0; k < n; ++k) {
        const float bk = B[t * n + k];
        const float* __restrict Ak = At + k * d;
        const float* __restrict hp = previous + k * d;
        float* __restrict a = decays.data() + i * nd + k * d;
        float* __restrict h = states.data() + i * nd + k * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          a[j] = std::exp(dtt[j] * Ak[j]);
          h[j] = a[j] * hp[j] + dtt[j] * ut[j] * bk;
        }
      }
      previous = states.data() + i * nd;
    }
    for (int64_t i = count - 1; i >= 0; --i) {
      const int64_t t = position(first + i, L, reverse);
      const float* __restrict ut = u + t * d;
      const float* __restrict dtt = dt + t * d;
      const float* __restrict gyt = gy + t * d;
      float* __restrict ddtt = ddt + t * d;
      const float* hprev = i > 0 ? states.data() + (i - 1) * nd : starts + c * nd;
      std::fill(gdu.begin(), gdu.end(), 0.f);
      for (int64_t k = 0; k < n; ++k) {
        const float bk = B[t * n + k], ck = C[t * n + k];
        const float* __restrict Ak = At + k * d;
        const float* __restrict a = decays.data() + i * nd + k * d;
        const float* __restrict h = states.data() + i * nd + k * d;
        const float* __restrict hp = hprev + k * d;
        float* __restrict g_next = carry.data() + k * d;
        float* __restrict dA = dAt + k * d;
        float* __restrict gd = gdu.data();
        float dc = 0.f, db = 0.f;
#pragma omp simd reduction(+ : dc, db)
        for (int64_t j = 0; j < d; ++j) {
          const float g = ck * gyt[j] + g_next[j];  // dL/dh_t
          dc += h[j] * gyt[j];
          db += g * dtt[j] * ut[j];
          gd[j] += g * bk;
          const float da = g * hp[j] * a[j];  // dL/d(delta_t A)
          ddtt[j] += da * Ak[j];
          dA[j] += da * dtt[j];
          g_next[j] = a[j] * g;
        }
        dC[t * n + k] = dc;
        dB[t * n + k] = db;
      }
      float* __restrict dut = du_out + t * d;
      for (int64_t j = 0; j < d; ++j) {
        ddtt[j] += gdu[j] * ut[j];
        dut[j] = gdu[j] * dtt[j];
      }
    }
  }
}

void check(const torch::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == dims,
              name, " must be a contiguous CPU float32 tensor with ", dims, " dimensions");
}

std::vector<torch::Tensor> scan_forward(torch::Tensor u, torch::Tensor delta, torch::Tensor At, torch::Tensor B,
                                        torch::Tensor C, bool reverse, int64_t T) {
  check(u, "u", 3), check(delta, "delta", 3), check(At, "At", 2), check(B, "B", 3), check(C, "C", 3);
  const int64_t b = u.size(0), L = u.size(1), d = u.size(2), n = At.size(0);
  auto y = torch::empty_like(u);
  auto starts = torch::empty({b, (L + T - 1) / T, n, d}, u.options());
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      forward_sequence(u.data_ptr<float>() + i * L * d, delta.data_ptr<float>() + i * L * d, At.data_ptr<float>(),
                       B.data_ptr<float>() + i * L * n, C.data_ptr<float>() + i * L * n, y.data_ptr<float>() + i * L * d,
                       starts.data_ptr<float>() + i * starts.stride(0), L, d, n, reverse, T);
  });
  return {y, starts};
}

std::vector<torch::Tensor> scan_backward(torch::Tensor u, torch::Tensor delta, torch::Tensor At, torch::Tensor B,
                                         torch::Tensor C, torch::Tensor gy, torch::Tensor starts, bool reverse,
                                         int64_t T) {
  check(gy, "grad_y", 3), check(starts, "starts", 4);
  const int64_t b = u.size(0), L = u.size(1), d = u.size(2), n = At.size(0);
  auto du = torch::empty_like(u), ddelta = torch::zeros_like(u), dB = torch::empty_like(B), dC = torch::empty_like(C);
  auto dAt = torch::zeros({b, n, d}, u.options());  // per sequence, summed by the caller: no shared writes
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      backward_sequence(u.data_ptr<float>() + i * L * d, delta.data_ptr<float>() + i * L * d, At.data_ptr<float>(),
                        B.data_ptr<float>() + i * L * n, C.data_ptr<float>() + i * L * n, gy.data_ptr<float>() + i * L * d,
                        starts.data_ptr<float>() + i * starts.stride(0), du.data_ptr<float>() + i * L * d,
                        ddelta.data_ptr<float>() + i * L * d, dAt.data_ptr<float>() + i * n * d,
                        dB.data_ptr<float>() + i * L * n, dC.data_ptr<float>() + i * L * n, L, d, n, reverse, T);
  });
  return {du, ddelta, dAt.sum(0), dB, dC};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward, "fused selective scan, forward");
  m.def("backward", &scan_backward, "fused selective scan, backward");
}
