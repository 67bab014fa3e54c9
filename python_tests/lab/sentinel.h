// The sentinel fill of the host runs' buffers (python_tests/lab/*_host.cpp): all-ones bytes, a
// NaN in float32, float16 and bfloat16 and not a NaN that arithmetic produces. An output still
// NaN was never written; a guard region no longer all sentinel was written past its buffer.
#pragma once

#include <algorithm>
#include <cstddef>

namespace drs_host {

constexpr unsigned char kSentinelByte = 0xff;

inline bool all_sentinel(const void* begin, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(begin);
  return std::all_of(p, p + bytes, [](unsigned char b) { return b == kSentinelByte; });
}

}  // namespace drs_host
