// centroid_interaction compiled for avx512 (ISA flags are set on this file only, by setup.py).
#define EDGEPLAID_ISA_AVX512
#include "centroid_interaction_impl.h"
