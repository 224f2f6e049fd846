/* MKL's fastest code paths on AMD processors.

   MKL picks its kernels by asking whether the processor is Intel's (this function, which MKL links through
   its own symbol table) before it looks at the instruction sets the processor has: on AMD it answers no,
   and MKL runs its AVX2 kernels on processors that have AVX-512. On this machine's AMD EPYC, sgemm of 8-32
   rows, the products a decoding step of many rows waits on, ran 2.5-3x slower than the same processor's
   AVX-512 kernels (70 against 190-240 GFLOP/s on one core; benchmarks/text_decode.py shows the step).
   Loaded before torch (atelier/__init__.py: atelier.common.native.unlock_mkl), this definition is the one
   MKL's call finds; MKL then chooses by the instruction sets the processor reports, as it does on Intel's. */
int mkl_serv_intel_cpu_true(void) { return 1; }
