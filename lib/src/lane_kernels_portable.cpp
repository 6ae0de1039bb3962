// The lane kernels compiled for one instruction set (flags in lib/CMakeLists.txt).
#define BNLAB_ISA portable
#define BNLAB_ISA_NAME "portable"
#include "lane_kernels.inc"
