// Which instruction sets this CPU and OS support, and which kernel set runs.
#pragma once
#include <string>

namespace edgeplaid {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false;
  bool amx_bf16 = false;  // AMX-TILE + AMX-BF16 on the CPU and tile state enabled in XCR0
  bool os_avx = false, os_avx512 = false;  // XCR0 says the OS saves ymm / zmm state
  bool amd = false;
  int family = 0;  // display family (base + extended)
};

const CpuFeatures& cpu_features();
const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);   // built into this extension
bool isa_supported(Isa isa);  // this CPU + OS can run it (and it was compiled)
// The fastest supported ISA: AVX-512 where its 512-bit units are full width, AVX2 on AMD
// family 19h (Zen 3/4), whose AVX-512 runs on 256-bit halves and measured no faster.
Isa best_isa();
// AMX usable by this process: amx_bf16, compiled in, and (Linux) the kernel granted the tile
// data permission, asked once on first call. The AMX kernels (bf16 attention) check it.
bool amx_ready();
// AMX tiles in use: amx_ready() and not turned off (EDGEPLAID_CPU_AMX=0 at first use, or
// set_amx_enabled(false)). attention checks it, and so does centroid_scores' centroid-major table
// (on tiles while the fp32 kernels run AVX-512). Turning it on where amx_ready() is false throws
// std::invalid_argument.
bool amx_enabled();
void set_amx_enabled(bool on);

// The kernel set in use: EDGEPLAID_CPU_ISA at first use, else the best supported; changed by
// set_active_isa ("auto": the best supported again, not forced). Throws std::invalid_argument for
// an unknown or unsupported name.
Isa active_isa();
void set_active_isa(const std::string& name);
// Whether EDGEPLAID_CPU_ISA or set_active_isa chose the kernel set (rather than best_isa()).
bool isa_forced();
// The float32 attention kernel's set: AVX-512 wherever it is supported, Zen 4 included (its 32
// vector registers hold the score and value tiles: 196 against 161 GFLOP/s for AVX2 on 17m's
// 4,096-token heads, 85% of the AVX2 FMA peak), unless an ISA is forced: then that one.
Isa attention_isa();
// The bf16 vector attention kernel (vdpbf16ps, the avx512bf16 unit) runs here: compiled in, the
// CPU has AVX512-BF16 with AVX-512 usable, and no narrower ISA is forced (EDGEPLAID_CPU_ISA,
// set_active_isa: an AVX2-only CPU is emulated whole). AMX tiles, where enabled, come first.
bool bf16_attention_ready();

}  // namespace edgeplaid
