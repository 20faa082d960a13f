// fused_decompress_maxsim compiled for scalar (ISA flags are set on this file only, by setup.py).
#define EDGEPLAID_ISA_SCALAR
#include "fused_decompress_maxsim_impl.h"
