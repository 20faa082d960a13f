// centroid_interaction compiled for avx512.
#define EDGEPLAID_ISA_AVX512
#include "isa_begin.h"
#include "centroid_interaction_impl.h"
