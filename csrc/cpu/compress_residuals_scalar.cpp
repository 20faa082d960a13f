// compress_residuals compiled for scalar.
#define EDGEPLAID_ISA_SCALAR
#include "isa_begin.h"
#include "compress_residuals_impl.h"
