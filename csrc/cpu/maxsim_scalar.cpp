// maxsim kernels compiled for scalar.
#define EDGEPLAID_ISA_SCALAR
#include "isa_begin.h"
#include "maxsim_impl.h"
