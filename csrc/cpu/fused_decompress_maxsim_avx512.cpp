// fused_decompress_maxsim compiled for avx512.
#define EDGEPLAID_ISA_AVX512
#include "isa_begin.h"
#include "fused_decompress_maxsim_impl.h"
