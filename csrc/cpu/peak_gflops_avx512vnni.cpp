// peak_gflops compiled for AVX-512 with VNNI: only the int8 kernel probe, whose 4-byte dot
// products become one vpdpbusd each (the rest of the op is the avx512 unit's).
#define EDGEPLAID_ISA_AVX512
#define EDGEPLAID_ISA_VNNI
#include "isa_begin.h"
#include "peak_gflops_impl.h"
