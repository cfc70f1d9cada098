// What dsv3's CPU kernels (panel_gemm.cpp, paged_attention.cpp) share: 16-lane vector types written
// with GCC vector extensions (compiled for this machine's widest vectors) and the two bit-level
// helpers that move values in and out of them without undefined behaviour.
#pragma once

#include <cstdint>
#include <cstring>

namespace dsv3_cpu {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

// sizeof(V) bytes from p, at any alignment
template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// the FP32 value of these bits (a BF16 value is the top half of an FP32 one)
inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace dsv3_cpu
