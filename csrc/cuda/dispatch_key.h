// The dispatch key the CUDA glue registers its kernels for: CUDA, or CPU in the emulation build, which runs the
// same glue and kernels on CPU tensors (csrc/cuda/emulation, tests/test_cuda_emulation.py).
#pragma once

#ifdef MTLFAST_CUDA_EMULATION
#define MTLFAST_CUDA_DISPATCH_KEY CPU
#else
#define MTLFAST_CUDA_DISPATCH_KEY CUDA
#endif
