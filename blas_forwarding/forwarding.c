// name -> scipy_name for every BLAS/LAPACK function libmlx.so imports (forwards.h, made
// by CMakeLists.txt). A tail jump, not a C call: the callee gets the caller's registers
// and stack as they are, so no prototype is needed and every calling convention holds.
#if defined(__x86_64__)
#define JUMP(target) "jmp " target "@PLT"
#elif defined(__aarch64__)
#define JUMP(target) "b " target
#else
#error "blas_forwarding: x86-64 or AArch64 only"
#endif

#define FORWARD(name)                          \
  __asm__(".text\n"                            \
          ".globl " #name "\n"                 \
          ".type " #name ", @function\n"       \
          #name ":\n"                          \
          "  " JUMP("scipy_" #name) "\n"       \
          ".size " #name ", . - " #name "\n");
#include "forwards.h"

// Which OpenBLAS this is, for reports (blas.py): the library reached through the forwards.
const char* scipy_openblas_get_config(void);
const char* scipy_openblas_get_corename(void);
const char* mlx_lora_blas_config(void) { return scipy_openblas_get_config(); }
const char* mlx_lora_blas_corename(void) { return scipy_openblas_get_corename(); }
