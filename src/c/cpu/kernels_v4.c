/* The row kernels for x86-64-v4: kernels.c compiled again with -march=x86-64-v4 (CMakeLists.txt). */
#define BN_LEVEL _v4
#include "kernels.c"
