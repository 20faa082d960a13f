// The FMA peak probe compiled for avx2 (ISA flags are set on this file only, by setup.py).
#define EDGEPLAID_ISA_AVX2
#include "peak_gflops_impl.h"
