// The lane kernels compiled for one instruction set (flags in lib/CMakeLists.txt).
#define BNLAB_ISA avx2
#define BNLAB_ISA_NAME "avx2"
#define BNLAB_NATIVE_BYTES 32  // one register
#define BNLAB_GEMM_VECS 2      // 16 registers: a tile of 4 x 16 floats
#include "lane_kernels.inc"
