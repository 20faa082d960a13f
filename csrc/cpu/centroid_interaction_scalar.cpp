// centroid_interaction compiled for scalar (ISA flags are set on this file only, by setup.py).
#define EDGEPLAID_ISA_SCALAR
#include "centroid_interaction_impl.h"
