// maxsim kernels compiled for avx512.
#define EDGEPLAID_ISA_AVX512
#include "isa_begin.h"
#include "maxsim_impl.h"
