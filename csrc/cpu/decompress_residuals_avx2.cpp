// decompress_residuals compiled for avx2.
#define EDGEPLAID_ISA_AVX2
#include "isa_begin.h"
#include "decompress_residuals_impl.h"
