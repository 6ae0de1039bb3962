// The lane kernels compiled for one instruction set (flags in lib/CMakeLists.txt).
#define BNLAB_ISA avx512
#define BNLAB_ISA_NAME "avx512"
#include "lane_kernels.inc"
