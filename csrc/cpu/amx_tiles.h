// The AMX tile configuration the tile kernels share (attention, centroid_scores): palette 1,
// every one of the 8 tiles 16 rows x 64 bytes (16 fp32 or 32 bf16 a row). The configuration is
// per thread: each kernel loads it on every pool thread that runs tiles and releases the tile
// state (_tile_release) when that thread is done.
#pragma once
#include "simd.h"

#if defined(EDGEPLAID_ISA_AMX)
namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
#endif  // EDGEPLAID_ISA_AMX
