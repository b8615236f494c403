"""brewnet's CUDA kernels (the .cu files here) and their launcher (ops.py); off unless BREWNET_CUDA_KERNELS=1."""
