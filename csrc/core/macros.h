// SPDX-License-Identifier: Apache-2.0
// Portability macros for the header-only math in csrc/core/, which is compiled by g++ for the CPU kernels and by
// nvcc for both host and device code. Nothing in core/ includes torch headers.
#pragma once

#if defined(__CUDACC__)
#define FOURBIT_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU kernels are compiled once per instruction set (see csrc/cpu/). A helper that is not inlined
// would become a weak symbol that the linker may take from the AVX-512 object file for the scalar path.
#define FOURBIT_HD inline __attribute__((always_inline))
#endif

#include <cstdint>
