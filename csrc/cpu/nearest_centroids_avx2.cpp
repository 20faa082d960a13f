// nearest_centroids compiled for avx2.
#define EDGEPLAID_ISA_AVX2
#include "isa_begin.h"
#include "nearest_centroids_impl.h"
