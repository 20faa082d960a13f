// nearest_centroids compiled for scalar.
#define EDGEPLAID_ISA_SCALAR
#include "isa_begin.h"
#include "nearest_centroids_impl.h"
