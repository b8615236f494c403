// Shared by every brewnet kernel source (prepended to each .cu before compiling).
//
// Every kernel is written in grid-stride form: each thread handles elements
// i, i + stride, ... of a flat range and never waits for another thread
// (no __syncthreads, no shared memory). Any launch size is then correct, and
// tests/cuda_harness.py can run the same source on the CPU by calling the
// kernel once per (block, thread) of a small made-up grid.
#define BN_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

#define BN_FLT_MAX 3.402823466e+38f
#define BN_FLT_MIN 1.175494351e-38f
