// nearest_centroids compiled for avx512.
#define EDGEPLAID_ISA_AVX512
#include "isa_begin.h"
#include "nearest_centroids_impl.h"
