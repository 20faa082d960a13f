// centroid_scores compiled for avx512.
#define EDGEPLAID_ISA_AVX512
#include "isa_begin.h"
#include "centroid_scores_impl.h"
