// compress_residuals compiled for avx2.
#define EDGEPLAID_ISA_AVX2
#include "isa_begin.h"
#include "compress_residuals_impl.h"
