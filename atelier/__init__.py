__version__ = "0.1.0"

# Before anything loads torch: MKL's AVX-512 kernels on AMD processors too (atelier/common/native/mkl_vendor.c).
from atelier.common.native import unlock_mkl as _unlock_mkl  # noqa: E402

_unlock_mkl()
