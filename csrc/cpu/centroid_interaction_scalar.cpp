// centroid_interaction compiled for scalar.
#define EDGEPLAID_ISA_SCALAR
#include "isa_begin.h"
#include "centroid_interaction_impl.h"
