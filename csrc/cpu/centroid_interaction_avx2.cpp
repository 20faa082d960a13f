// centroid_interaction compiled for avx2.
#define EDGEPLAID_ISA_AVX2
#include "isa_begin.h"
#include "centroid_interaction_impl.h"
