// The FMA peak probe compiled for avx2.
#define EDGEPLAID_ISA_AVX2
#include "isa_begin.h"
#include "peak_gflops_impl.h"
