// name -> scipy_name for every BLAS/LAPACK function libmlx.so imports (forwards.h, made
// by CMakeLists.txt). A tail jump, not a C call: the callee gets the caller's registers
// and stack as they are, so no prototype is needed and every calling convention holds.
// Each stub starts with its landing pad where the toolchain marks objects for indirect-branch
// tracking (x86's CET, Arm's BTI): libmlx calls these through the PLT, an indirect branch.
#if defined(__x86_64__)
#if defined(__CET__)
#define LANDING "endbr64\n"
#else
#define LANDING ""
#endif
#define JUMP(target) LANDING "  jmp " target "@PLT"
#elif defined(__aarch64__)
#define JUMP(target) "  hint #34\n  b " target  // hint #34: bti c, a no-op where BTI is off
#else
#error "blas_forwarding: x86-64 or AArch64 only"
#endif

#define FORWARD(name)                          \
  __asm__(".text\n"                            \
          ".globl " #name "\n"                 \
          ".type " #name ", @function\n"       \
          #name ":\n"                          \
          JUMP("scipy_" #name) "\n"            \
          ".size " #name ", . - " #name "\n");
#include "forwards.h"

// Which OpenBLAS this is, for reports (blas.py): the library reached through the forwards.
const char* scipy_openblas_get_config(void);
const char* scipy_openblas_get_corename(void);
const char* mlx_lora_blas_config(void) { return scipy_openblas_get_config(); }
const char* mlx_lora_blas_corename(void) { return scipy_openblas_get_corename(); }
