// The lane kernels compiled for one instruction set (flags in lib/CMakeLists.txt).
#define BNLAB_ISA avx512
#define BNLAB_ISA_NAME "avx512"
#define BNLAB_NATIVE_BYTES 64  // one register
#define BNLAB_GEMM_VECS 4      // 32 registers: a tile of 4 x 64 floats
#include "lane_kernels.inc"
