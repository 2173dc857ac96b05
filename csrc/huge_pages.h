// SPDX-License-Identifier: Apache-2.0
// A fresh multi-megabyte CPU output is mostly page faults: the kernel zeroes each 4 KiB page on first touch, which
// costs more than most of our kernels' work on it. Asking for transparent huge pages on the (2 MiB-aligned interior
// of the) buffer before writing cuts the number of faults 512-fold. Advisory only: the memory stays torch's.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fourbit {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!t.is_cpu()) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.mutable_data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last >= first + 2 * kHuge) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

}  // namespace fourbit
