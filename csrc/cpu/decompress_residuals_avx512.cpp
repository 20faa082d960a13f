// decompress_residuals compiled for avx512 (ISA flags: setup.py).
#define EDGEPLAID_ISA_AVX512
#include "decompress_residuals_impl.h"
