"""The built extension keeps each ISA's instructions inside its own kernels.

A function compiled with -mavx512f and shared by name with another translation unit (an
inline helper, a std:: template) could be picked by the linker for the AVX2 or scalar path
and crash a CPU without AVX-512. This disassembles edgeplaid._C and checks that zmm
registers appear only in edgeplaid::avx512 code, and ymm only in avx2/avx512 code.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

C = pytest.importorskip("edgeplaid._C")


def _functions_using(register: str) -> set[str]:
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", C.__file__], capture_output=True, text=True, check=True
    ).stdout
    users, current = set(), None
    for line in out.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = header.group(1)
        elif current and f"%{register}" in line:
            users.add(current)
    return users


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_wide_registers_stay_in_their_isa():
    # demangled, or mangled where objdump cannot demangle (deeply nested lambdas)
    avx512 = (
        *("edgeplaid::avx512::", "edgeplaid::avx512vnni::", "edgeplaid::avx512bf16::", "edgeplaid::amx::"),
        *("9edgeplaid6avx512", "9edgeplaid10avx512vnni", "9edgeplaid10avx512bf16", "9edgeplaid3amx"),
    )
    zmm = {f for f in _functions_using("zmm") if not any(ns in f for ns in avx512)}
    assert not zmm, f"AVX-512 instructions outside edgeplaid::avx512(vnni, bf16) and ::amx: {sorted(zmm)[:5]}"
    ymm = {
        f
        for f in _functions_using("ymm")
        if not any(ns in f for ns in (*avx512, "edgeplaid::avx2::", "9edgeplaid4avx2"))
    }
    assert not ymm, f"AVX instructions outside the avx2/avx512 kernels: {sorted(ymm)[:5]}"
