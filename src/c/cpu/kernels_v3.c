/* The row kernels for x86-64-v3: kernels.c compiled again with -march=x86-64-v3 (CMakeLists.txt). */
#define BN_LEVEL _v3
#include "kernels.c"
