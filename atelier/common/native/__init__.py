"""Atelier's native kernels (kernels.cpp): the decoding step and the plain sampling draw in C++.

`make` compiles them once on the machine that runs them (`python -m atelier.common.native`, about
20 s: torch's extension builder, g++ and ninja) into build/ beside this file, under a name that carries
the source's hash, so an edited kernels.cpp is never loaded stale. At run time `kernels()` only loads
what was built: where nothing was (no compiler, a read-only install), or ATELIER_NATIVE=0, the callers
run their Python paths, which compute the same thing (tests/test_native.py holds the two together).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
BUILD_DIR = Path(__file__).with_name("build")
MKL_VENDOR_SOURCE = Path(__file__).with_name("mkl_vendor.c")
MKL_VENDOR_LIBRARY = BUILD_DIR / "libatelier_mkl_vendor.so"
# -march=native: built where it runs. The reassociation flags let g++ vectorise the attention's dot
# products and sums; no -ffast-math, whose finite-math assumption would not hold for masked logits.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]

# A decoding step splits its rows between threads (kernels.cpp's Team) when each gets at least this many.
# Split in two, tang-poet's step of 4 rows took as long as whole (both halves read all the weights), one of
# 8 rows 0.88 of the time, 12 rows 0.72, 16 rows 0.69, 32 rows 0.60.
ROWS_PER_THREAD = 4

_enabled = True
_step_threads = os.cpu_count() or 1


def module_name() -> str:
    return "atelier_kernels_" + hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


def build(verbose: bool = False) -> ModuleType:
    """Compile kernels.cpp into BUILD_DIR (nothing to do when this source is built already)."""
    from torch.utils.cpp_extension import load

    BUILD_DIR.mkdir(exist_ok=True)
    # torch runs `ninja` from PATH: the one pip put beside this interpreter, when the venv is not activated
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for old in BUILD_DIR.glob("atelier_kernels_*.so"):  # builds of earlier sources
        if old.stem != module_name():
            old.unlink()
    build_mkl_vendor()
    return load(module_name(), [str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(BUILD_DIR), verbose=verbose)


def build_mkl_vendor() -> Path:
    """Compile mkl_vendor.c (a C compiler from PATH: cc, as Python's own extensions use)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:  # then renamed: a half-written library never loads
        out = Path(tmp) / MKL_VENDOR_LIBRARY.name
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(out), str(MKL_VENDOR_SOURCE)], check=True)
        os.replace(out, MKL_VENDOR_LIBRARY)
    return MKL_VENDOR_LIBRARY


def unlock_mkl() -> bool:
    """Let MKL run the kernels of the instruction sets an AMD processor has (mkl_vendor.c says why); True when
    it will. Only before torch is loaded (MKL binds the answer once): atelier/__init__.py calls it.
    ATELIER_MKL_VENDOR_CHECK=keep leaves MKL's own choice."""
    if "torch" in sys.modules or os.environ.get("ATELIER_MKL_VENDOR_CHECK") == "keep" or not MKL_VENDOR_LIBRARY.exists():
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            if "AuthenticAMD" not in f.read(4096):
                return False  # Intel's processors are answered yes already
    except OSError:
        return False
    import ctypes

    try:
        ctypes.CDLL(str(MKL_VENDOR_LIBRARY), mode=os.RTLD_GLOBAL)  # global: found before libtorch's own
    except OSError:
        return False
    return True


def use(enabled: bool, step_threads: int | None = None) -> None:
    """Turn the native paths on or off for this process (ATELIER_NATIVE; benchmarks compare both), and set
    how many threads one step may share (ATELIER_STEP_THREADS; None: as it was, every core at first)."""
    global _enabled, _step_threads
    _enabled = enabled
    if step_threads is not None:
        _step_threads = max(1, step_threads)


def step_parts(tokens: int) -> int:
    """How many threads a step of `tokens` tokens shares: one per ROWS_PER_THREAD, up to the step threads."""
    return max(1, min(_step_threads, tokens // ROWS_PER_THREAD))


def kernels() -> ModuleType | None:
    """The compiled module, or None: disabled, or not built for this source."""
    return _load() if _enabled else None


@cache
def _load() -> ModuleType | None:
    name = module_name()
    path = BUILD_DIR / f"{name}.so"
    if not path.exists():
        log.warning("native kernels not built (%s missing): decoding runs its Python path; run `make` or "
                    "`python -m atelier.common.native`", path)
        return None
    import torch  # noqa: F401 — the module links against libtorch, which must be loaded first

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
