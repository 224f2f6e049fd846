"""python -m atelier.common.native: compile the native kernels for this machine (`make` runs it)."""

import sys
import time

from atelier.common.native import BUILD_DIR, build, module_name

start = time.perf_counter()
try:
    build()
except Exception as e:  # noqa: BLE001 — the Python paths still run; say why the fast ones will not
    print(f"native kernels not built ({type(e).__name__}: {e}); decoding will use its Python path", file=sys.stderr)
    sys.exit(0)
print(f"native kernels: {BUILD_DIR / module_name()}.so ({time.perf_counter() - start:.1f} s)")
