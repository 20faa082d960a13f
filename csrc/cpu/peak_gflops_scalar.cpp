// The FMA peak probe compiled for scalar.
#define EDGEPLAID_ISA_SCALAR
#include "isa_begin.h"
#include "peak_gflops_impl.h"
