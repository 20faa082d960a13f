// decompress_residuals compiled for scalar (ISA flags: setup.py).
#define EDGEPLAID_ISA_SCALAR
#include "decompress_residuals_impl.h"
