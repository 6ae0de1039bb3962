// The lane kernels compiled for one instruction set (flags in lib/CMakeLists.txt).
#define BNLAB_ISA avx2
#define BNLAB_ISA_NAME "avx2"
#include "lane_kernels.inc"
