// maxsim kernels compiled for avx2.
#define EDGEPLAID_ISA_AVX2
#include "isa_begin.h"
#include "maxsim_impl.h"
