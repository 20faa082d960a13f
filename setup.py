"""Build of edgeplaid's C++ extension `edgeplaid._C` (pybind11, C++17, no torch ABI).

One translation unit per ISA: `csrc/cpu/*_avx2.cpp` and `*_avx512.cpp` switch their ISA on
with a target pragma after the library headers (csrc/cpu/isa_begin.h), so that only
edgeplaid's own code in those files uses AVX2/AVX-512 and library templates stay baseline;
everything is compiled for the baseline x86-64 otherwise. The extension loads on any CPU and
picks its kernels at run time. ISA files whose instructions the compiler lacks are left out.

Environment:
  EDGEPLAID_REQUIRE_CPP=1   a failed C++ build is fatal (CI sets it); otherwise it warns and
                            installs the pure-Python package (reference backend only).
  EDGEPLAID_SANITIZE=1      build with -fsanitize=address,undefined (for the sanitizer run).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension

    ParallelCompile("EDGEPLAID_BUILD_JOBS", default=0).install()  # one job per core
except ImportError:  # pybind11 is a build requirement; this only helps a clear message
    Pybind11Extension = None

ROOT = Path(__file__).parent
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    # Only the int8 code-scoring kernel and its probe (vpdpbusd); chosen at run time when the CPU has VNNI.
    "avx512vnni": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx512vnni",
        "-mavx2",
        "-mfma",
        "-mf16c",
    ],
}
COMMON_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno", "-pthread"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]


def isa_of(source: str) -> str:
    stem = Path(source).stem
    for isa in ISA_FLAGS:
        if stem.endswith("_" + isa):
            return isa
    return "baseline"


def sources() -> list[str]:
    cpu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    return ["csrc/bindings.cpp", *cpu]


def required() -> bool:
    return os.environ.get("EDGEPLAID_REQUIRE_CPP", "") not in ("", "0")


class BuildExt(build_ext):
    """Adds ISA flags per file, drops ISAs the compiler lacks, and makes failure optional."""

    def _compiler_accepts(self, flags: list[str]) -> bool:
        """Whether the compiler knows these ISA flags (and so the matching target pragma)."""
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.cpp"
            src.write_text("int main() { return 0; }\n")
            try:
                self.compiler.compile([str(src)], output_dir=tmp, extra_postargs=flags)
                return True
            except Exception:
                return False

    def build_extensions(self) -> None:
        available = {isa for isa, flags in ISA_FLAGS.items() if self._compiler_accepts(flags)}
        sanitize = os.environ.get("EDGEPLAID_SANITIZE", "") not in ("", "0")
        for ext in self.extensions:
            ext.sources = [s for s in ext.sources if isa_of(s) in available | {"baseline"}]
            ext.define_macros += [(f"EDGEPLAID_HAVE_{isa.upper()}", "1") for isa in sorted(available)]
            if sanitize:
                ext.extra_link_args += SANITIZE_FLAGS
        original = self.compiler._compile

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            flags = list(extra_postargs) + COMMON_FLAGS
            if sanitize:
                flags += SANITIZE_FLAGS
            original(obj, src, ext, cc_args, flags, pp_opts)

        self.compiler._compile = compile_one
        try:
            super().build_extensions()
        except Exception as exc:  # compiler missing or failing
            if required():
                raise
            print(
                f"WARNING: edgeplaid C++ extension not built ({exc}); "
                "only the reference backend will be available.",
                file=sys.stderr,
            )


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(Pybind11Extension("edgeplaid._C", sources(), include_dirs=["csrc"], cxx_std=17))
elif required():
    raise RuntimeError("EDGEPLAID_REQUIRE_CPP=1 but pybind11 is not installed")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
