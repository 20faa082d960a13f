// fused_decompress_maxsim compiled for scalar.
#define EDGEPLAID_ISA_SCALAR
#include "isa_begin.h"
#include "fused_decompress_maxsim_impl.h"
