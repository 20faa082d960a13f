// fused_decompress_maxsim compiled for avx512 (ISA flags are set on this file only, by setup.py).
#define EDGEPLAID_ISA_AVX512
#include "fused_decompress_maxsim_impl.h"
