// The lane kernels compiled for one instruction set (flags in lib/CMakeLists.txt).
#define BNLAB_ISA portable
#define BNLAB_ISA_NAME "portable"
#define BNLAB_NATIVE_BYTES 16  // one register
#define BNLAB_GEMM_VECS 2      // 16 registers: a tile of 4 x 8 floats
#include "lane_kernels.inc"
