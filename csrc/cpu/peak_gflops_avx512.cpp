// The FMA peak probe compiled for avx512.
#define EDGEPLAID_ISA_AVX512
#include "isa_begin.h"
#include "peak_gflops_impl.h"
