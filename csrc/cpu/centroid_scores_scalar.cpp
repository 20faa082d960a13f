// centroid_scores compiled for scalar.
#define EDGEPLAID_ISA_SCALAR
#include "isa_begin.h"
#include "centroid_scores_impl.h"
