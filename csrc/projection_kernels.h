// C ABI of the CUDA kernels in projection_kernels.cu. That file includes no torch header,
// so it compiles with plain `nvcc -c`; projection_cuda.cpp launches it from ATen.
//
// Layouts (all contiguous, row-major, batch first):
//   g: (batch, m, n) gradients in `g_dtype`; u: (batch, m, k); v: (batch, n, k) bases in
//   `basis_dtype`; fp32 for every intermediate. Each function returns a cudaError_t
//   (0 on success) for the launch.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { CL_DTYPE_F32 = 0, CL_DTYPE_F16 = 1, CL_DTYPE_BF16 = 2 };

// Largest k the reductions take; larger k goes through cuBLAS (the GEMM is then
// compute-bound and cuBLAS wins).
#define CL_FUSED_MAX_K 32
// Largest combined width of the rank update.
#define CL_UPDATE_MAX_K 64

// partial[s, b, a, j] = sum over rows i of chunk s of u[b, i, a] * g[b, i, j]
// (s < ceil(m / rows_per_chunk); sum over s gives U^T G).
int cl_left_reduce(const void* g, int g_dtype, const void* u, int basis_dtype,
                   float* partial, int64_t batch, int64_t m, int64_t n, int64_t k,
                   int64_t rows_per_chunk, void* stream);

// out[b, i, a] = sum_j g[b, i, j] * v[b, j, a]   (G V)
int cl_right_reduce(const void* g, int g_dtype, const void* v, int basis_dtype, float* out,
                    int64_t batch, int64_t m, int64_t n, int64_t k, void* stream);

// g[b, i, j] -= sum_a l[b, i, a] * r[b, j, a]   (G -= L R^T, one read and one write of G)
int cl_rank_update(void* g, int g_dtype, const float* l, const float* r, int64_t batch,
                   int64_t m, int64_t n, int64_t kk, void* stream);

#ifdef __cplusplus
}
#endif
