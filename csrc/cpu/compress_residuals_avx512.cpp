// compress_residuals compiled for avx512.
#define EDGEPLAID_ISA_AVX512
#include "isa_begin.h"
#include "compress_residuals_impl.h"
