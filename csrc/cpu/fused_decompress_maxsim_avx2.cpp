// fused_decompress_maxsim compiled for avx2.
#define EDGEPLAID_ISA_AVX2
#include "isa_begin.h"
#include "fused_decompress_maxsim_impl.h"
