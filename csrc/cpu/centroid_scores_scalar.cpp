// centroid_scores compiled for scalar (ISA flags are set on this file only, by setup.py).
#define EDGEPLAID_ISA_SCALAR
#include "centroid_scores_impl.h"
