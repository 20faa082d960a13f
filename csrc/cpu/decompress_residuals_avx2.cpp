// decompress_residuals compiled for avx2 (ISA flags: setup.py).
#define EDGEPLAID_ISA_AVX2
#include "decompress_residuals_impl.h"
