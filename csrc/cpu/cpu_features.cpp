#include "cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define EDGEPLAID_X86 1
#endif

namespace edgeplaid {
namespace {

#if defined(EDGEPLAID_X86)
uint64_t read_xcr0() {
  uint32_t lo, hi;
  // xgetbv via inline asm: the intrinsic would need -mxsave on this (ISA-neutral) file.
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(EDGEPLAID_X86)
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d)) f.amd = b == 0x68747541u;  // "Auth"enticAMD
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.family = int((a >> 8) & 0xf) + ((((a >> 8) & 0xf) == 0xf) ? int((a >> 20) & 0xff) : 0);
  const bool osxsave = c & (1u << 27);
  bool os_amx = false;
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  if (osxsave) {
    const uint64_t xcr0 = read_xcr0();
    f.os_avx = (xcr0 & 0x6) == 0x6;             // SSE + AVX state
    f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask + zmm state
    os_amx = (xcr0 & 0x60000) == 0x60000;              // tile config + tile data state
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = b & (1u << 5);
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512_vnni = c & (1u << 11);
    f.amx_bf16 = (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16, AMX-TILE
  }
  f.amx_bf16 = f.amx_bf16 && os_amx && f.os_avx512;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = a & (1u << 5);
#endif
  return f;
}

bool request_amx() {
#if defined(EDGEPLAID_X86) && defined(__linux__) && defined(EDGEPLAID_HAVE_AMX)
  if (!cpu_features().amx_bf16) return false;
  // Linux hands out the 8 KiB tile data state per process on request (arch_prctl
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without it the first tile instruction faults.
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::scalar;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw std::invalid_argument("EDGEPLAID_CPU_ISA: expected one of scalar, avx2, avx512, got '" +
                              name + "'");
}

std::atomic<bool> g_forced{false};  // EDGEPLAID_CPU_ISA or set_active_isa chose the kernel set

Isa initial_isa() {
  const char* env = std::getenv("EDGEPLAID_CPU_ISA");
  if (env == nullptr || *env == '\0') return best_isa();
  g_forced.store(true, std::memory_order_relaxed);
  const Isa isa = parse_isa(env);
  if (!isa_supported(isa))
    throw std::invalid_argument(std::string("EDGEPLAID_CPU_ISA=") + env +
                                ": this CPU or build does not support it");
  return isa;
}

std::atomic<int> g_active{-1};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2:
#if defined(EDGEPLAID_HAVE_AVX2)
      return true;
#else
      return false;
#endif
    case Isa::avx512:
#if defined(EDGEPLAID_HAVE_AVX512)
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool isa_supported(Isa isa) {
  if (!isa_compiled(isa)) return false;
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return f.os_avx && f.avx2 && f.fma && f.f16c;
    case Isa::avx512:
      return f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.f16c;
  }
  return false;
}

Isa best_isa() {
  // On Zen 4 the AVX2 kernels measured 5-15% faster than the AVX-512 ones (benchmarks/).
  const bool half_width_avx512 = cpu_features().amd && cpu_features().family == 0x19;
  if (isa_supported(Isa::avx512) && !(half_width_avx512 && isa_supported(Isa::avx2))) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

bool amx_ready() {
  static const bool ready = request_amx();  // thread-safe static init: asked once
  return ready;
}

static std::atomic<int>& amx_setting() {
  static std::atomic<int> on{[] {
    const char* env = std::getenv("EDGEPLAID_CPU_AMX");
    if (env == nullptr || *env == '\0') return 1;
    const std::string v(env);
    if (v == "0") return 0;
    if (v == "1") return 1;
    throw std::invalid_argument("EDGEPLAID_CPU_AMX: expected 0 or 1, got '" + v + "'");
  }()};
  return on;
}

bool amx_enabled() { return amx_ready() && amx_setting().load(std::memory_order_relaxed) != 0; }

void set_amx_enabled(bool on) {
  if (on && !amx_ready())
    throw std::invalid_argument("on: this CPU, OS or build cannot run AMX tiles (cpu_info()['amx_ready'] is False)");
  amx_setting().store(on ? 1 : 0, std::memory_order_relaxed);
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    v = int(initial_isa());
    g_active.store(v, std::memory_order_relaxed);
  }
  return Isa(v);
}

void set_active_isa(const std::string& name) {
  if (name == "auto") {  // back to the CPU's own choice, nothing forced
    g_active.store(int(best_isa()), std::memory_order_relaxed);
    g_forced.store(false, std::memory_order_relaxed);
    return;
  }
  const Isa isa = parse_isa(name);
  if (!isa_supported(isa))
    throw std::invalid_argument("isa: '" + name + "' is not supported by this CPU or build");
  g_active.store(int(isa), std::memory_order_relaxed);
  g_forced.store(true, std::memory_order_relaxed);
}

bool isa_forced() {
  (void)active_isa();  // reads EDGEPLAID_CPU_ISA on first use
  return g_forced.load(std::memory_order_relaxed);
}

Isa attention_isa() {
  return !isa_forced() && isa_supported(Isa::avx512) ? Isa::avx512 : active_isa();
}

bool bf16_attention_ready() {
#if defined(EDGEPLAID_HAVE_AVX512BF16)
  return cpu_features().avx512_bf16 && attention_isa() == Isa::avx512;  // avx512: supported, not forced narrower
#else
  return false;
#endif
}

}  // namespace edgeplaid
