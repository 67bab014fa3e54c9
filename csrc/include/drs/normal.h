// Standard normal draws from Philox output by Box–Muller, in branch-free float32 arithmetic so
// that the CPU loop vectorises and the CUDA kernel computes the same numbers.
//
// Lane pair (0, 1) of a Philox output gives normals 0 and 1, lane pair (2, 3) normals 2 and 3:
//   u_a = uniform(lane a), u_b = uniform(lane b),   r = sqrt(-2 ln u_a),
//   z_a = r cos(2π u_b),   z_b = r sin(2π u_b).
// uniform(v) = float(v) * 2^-32 + 2^-33 lies in (0, 1] (never log(0)), the convention of cuRAND.
// ln and sincos(2π u) are Cephes-style minimax polynomials (about 1 ulp on their reduced ranges);
// drs_ext.reference computes the same draws with float64 libm as an independent check.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "drs/philox.h"

namespace drs {

DRS_HOST_DEVICE float uint_as_float(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(v);
#else
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
#endif
}

DRS_HOST_DEVICE uint32_t float_as_uint(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t v;
  std::memcpy(&v, &f, sizeof v);
  return v;
#endif
}

DRS_HOST_DEVICE float uniform_open_closed(uint32_t v) {
  return static_cast<float>(v) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}

// Natural log for normal positive floats (every uniform above is one): x = 2^e * m with
// m in [sqrt(1/2), sqrt(2)), ln x = e ln 2 + ln m, ln m by the Cephes logf polynomial.
DRS_HOST_DEVICE float log_positive(float x) {
  const uint32_t bits = float_as_uint(x);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 126;
  float m = uint_as_float((bits & 0x807fffffu) | 0x3f000000u);  // m in [0.5, 1)
  const bool small = m < 0.70710678118654752f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// sin(2πu) and cos(2πu) for u in [0, 1]. The reduction is exact: q = round(4u), f = u - q/4 is
// computed without rounding (Sterbenz), so |2πf| <= π/4 and one polynomial pair suffices.
DRS_HOST_DEVICE void sincos_2pi(float u, float* s, float* c) {
  const float q = std::floor(4.0f * u + 0.5f);
  const float a = (u - 0.25f * q) * 6.28318530717958648f;
  const float z = a * a;
  const float sin_a = a + a * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z -
                                   1.6666654611e-1f);
  const float cos_a = 1.0f - 0.5f * z +
                      z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                               4.166664568298827e-2f);
  const int quadrant = static_cast<int>(q) & 3;
  const float sin_r = (quadrant & 1) ? cos_a : sin_a;
  const float cos_r = (quadrant & 1) ? sin_a : cos_a;
  *s = (quadrant & 2) ? -sin_r : sin_r;
  *c = ((quadrant + 1) & 2) ? -cos_r : cos_r;
}

// r^2 = -2 ln u_a is clamped at 0 by a select rather than std::fmax (same value: r^2 is never
// NaN), because GCC vectorises fmax only under -ffinite-math-only and the CPU kernel's loop over
// normal4 must vectorise.
DRS_HOST_DEVICE void box_muller(uint32_t va, uint32_t vb, float* za, float* zb) {
  const float ln_u = log_positive(uniform_open_closed(va));
  const float r2 = -2.0f * ln_u;
  const float r = std::sqrt(r2 > 0.0f ? r2 : 0.0f);
  float s, c;
  sincos_2pi(uniform_open_closed(vb), &s, &c);
  *za = r * c;
  *zb = r * s;
}

// The four standard normals of one Philox output.
DRS_HOST_DEVICE void normals_of(const Uint4& r, float out[4]) {
  box_muller(r.x, r.y, &out[0], &out[1]);
  box_muller(r.z, r.w, &out[2], &out[3]);
}

// The four standard normals of element group `group` (elements 4*group .. 4*group + 3).
DRS_HOST_DEVICE void normal4(uint32_t key0, uint32_t key1, uint32_t group, uint64_t sample,
                             uint32_t branch, uint32_t stream, float out[4]) {
  normals_of(philox4x32_10(noise_counter(group, sample, branch, stream), key0, key1), out);
}

// The same draws from precomputed round keys (philox_keys), as the CUDA kernels take them.
DRS_HOST_DEVICE void normal4(const PhiloxKeys& keys, uint32_t group, uint64_t sample,
                             uint32_t branch, uint32_t stream, float out[4]) {
  normals_of(philox4x32_10(noise_counter(group, sample, branch, stream), keys), out);
}

}  // namespace drs
