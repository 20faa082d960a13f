// maxsim kernels compiled for scalar (ISA flags are set on this file only, by setup.py).
#define EDGEPLAID_ISA_SCALAR
#include "maxsim_impl.h"
