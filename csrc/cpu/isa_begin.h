// First include of every per-ISA translation unit (after it defines EDGEPLAID_ISA_<name>).
//
// Library headers come first, compiled for the baseline x86-64; only then is the ISA switched
// on, with a target pragma, for edgeplaid's own code that follows. Library templates (e.g.
// std::vector<float>::assign) are therefore compiled for the baseline wherever they are
// instantiated: with file-wide -mavx512f flags, the linker could keep one translation unit's
// AVX-512 copy of such a function for every caller and crash the AVX2 path on a CPU without
// AVX-512. tests/test_isa_isolation.py checks the built binary for this.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(EDGEPLAID_ISA_AVX2) || defined(EDGEPLAID_ISA_AVX512)
#include <immintrin.h>
#endif

#if defined(EDGEPLAID_ISA_AVX512) && defined(EDGEPLAID_ISA_AMX)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")
#elif defined(EDGEPLAID_ISA_AVX512) && defined(EDGEPLAID_ISA_BF16)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#elif defined(EDGEPLAID_ISA_AVX512) && defined(EDGEPLAID_ISA_VNNI)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#elif defined(EDGEPLAID_ISA_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#elif defined(EDGEPLAID_ISA_AVX2)
#pragma GCC target("avx2,fma,f16c")
#endif
