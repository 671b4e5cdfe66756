// CUDA kernels for the `cuda` backend of the gradient projection (svd_orthogonal).
//
// Where they beat cuBLAS batched GEMM: for small k the projection is memory-bound, and
// the GEMM sequence (U^T G, G -= U T, G V, G -= T V^T) reads G four times and writes it
// twice, plus fp32 copies when G is bf16/fp16. Here two_sided is
//   T1 = U^T G, T2 = G V            (two reads of G, fp32 accumulation)
//   G -= [U, T2] [T1 - (T1 V) V^T ; V^T]   (one read + one write, in G's own dtype)
// with the small (k x n, m x k) pieces in between done by the caller. Gradients and
// bases are read in fp32, fp16 or bf16; all sums are fp32.
//
// No torch headers here: this file compiles with plain `nvcc -c` (tested in CI).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "projection_kernels.h"

namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------- G V (right side)
// One warp per row of G; lanes stride over columns j, each lane keeps KT partial sums,
// and a 32-row slice of V is staged in shared memory for the 8 warps of a block.
constexpr int kRowsPerBlock = 8;

template <typename TG, typename TB, int KT>
__global__ void right_reduce_kernel(const TG* __restrict__ g, const TB* __restrict__ v,
                                    float* __restrict__ out, int64_t m, int64_t n, int k) {
  __shared__ float v_tile[kWarp][KT + 1];  // +1: lanes read rows, avoid bank conflicts
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int64_t b = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
  const bool row_ok = i < m;
  const TG* g_row = g + (b * m + (row_ok ? i : 0)) * n;
  const TB* v_b = v + b * n * k;

  float acc[KT];
#pragma unroll
  for (int a = 0; a < KT; ++a) acc[a] = 0.f;

  for (int64_t j0 = 0; j0 < n; j0 += kWarp) {
    for (int idx = warp * kWarp + lane; idx < kWarp * KT; idx += kRowsPerBlock * kWarp) {
      const int jj = idx / KT, a = idx % KT;
      const int64_t j = j0 + jj;
      v_tile[jj][a] = (j < n && a < k) ? to_float(v_b[j * k + a]) : 0.f;
    }
    __syncthreads();
    const int64_t j = j0 + lane;
    const float gv = (row_ok && j < n) ? to_float(g_row[j]) : 0.f;
#pragma unroll
    for (int a = 0; a < KT; ++a) acc[a] += gv * v_tile[lane][a];
    __syncthreads();
  }
  // Reduce each column over the warp; lane a keeps column a.
  float mine = 0.f;
#pragma unroll
  for (int a = 0; a < KT; ++a) {
    float s = acc[a];
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      s += __shfl_xor_sync(0xffffffffu, s, offset);
    }
    if (lane == a) mine = s;
  }
  if (row_ok && lane < k) out[(b * m + i) * k + lane] = mine;
}

// ---------------------------------------------------------------- U^T G (left side)
// One thread per column j (coalesced rows of G); rows are split in chunks over
// blockIdx.z so small-n problems still fill the GPU; each chunk writes its own partial
// sums (deterministic; the caller adds the chunks).
constexpr int kColsPerBlock = 128;
constexpr int kStageRows = 32;

template <typename TG, typename TB, int KT>
__global__ void left_reduce_kernel(const TG* __restrict__ g, const TB* __restrict__ u,
                                   float* __restrict__ partial, int64_t batch, int64_t m,
                                   int64_t n, int k, int64_t rows_per_chunk) {
  __shared__ float u_tile[kStageRows][KT];  // every thread reads the same entry: broadcast
  const int64_t b = blockIdx.y;
  const int64_t s = blockIdx.z;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + threadIdx.x;
  const int64_t i_begin = s * rows_per_chunk;
  const int64_t i_end = i_begin + rows_per_chunk < m ? i_begin + rows_per_chunk : m;
  const TB* u_b = u + b * m * k;
  const TG* g_b = g + b * m * n;

  float acc[KT];
#pragma unroll
  for (int a = 0; a < KT; ++a) acc[a] = 0.f;

  for (int64_t i0 = i_begin; i0 < i_end; i0 += kStageRows) {
    for (int idx = threadIdx.x; idx < kStageRows * KT; idx += kColsPerBlock) {
      const int ii = idx / KT, a = idx % KT;
      const int64_t i = i0 + ii;
      u_tile[ii][a] = (i < i_end && a < k) ? to_float(u_b[i * k + a]) : 0.f;
    }
    __syncthreads();
    const int64_t rows = i_end - i0 < kStageRows ? i_end - i0 : kStageRows;
    if (j < n) {
      for (int ii = 0; ii < rows; ++ii) {
        const float gv = to_float(g_b[(i0 + ii) * n + j]);
#pragma unroll
        for (int a = 0; a < KT; ++a) acc[a] += u_tile[ii][a] * gv;
      }
    }
    __syncthreads();
  }
  if (j < n) {
    float* out = partial + (s * batch + b) * k * n;
#pragma unroll
    for (int a = 0; a < KT; ++a) {
      if (a < k) out[a * n + j] = acc[a];
    }
  }
}

// ---------------------------------------------------------------- G -= L R^T
// A 32x32 tile of G per block (32x8 threads, 4 rows each); the tile's rows of L and of R
// are staged in shared memory. G is read once and written once, in its own dtype.
constexpr int kTile = 32;
constexpr int kTileRowsPerPass = 8;

template <typename TG, int KT>
__global__ void rank_update_kernel(TG* __restrict__ g, const float* __restrict__ l,
                                   const float* __restrict__ r, int64_t m, int64_t n,
                                   int kk) {
  __shared__ float l_tile[kTile][KT + 1];
  __shared__ float r_tile[kTile][KT + 1];
  const int64_t b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int idx = ty * kTile + tx; idx < kTile * KT; idx += kTile * kTileRowsPerPass) {
    const int row = idx / KT, a = idx % KT;
    const int64_t i = i0 + row, j = j0 + row;
    l_tile[row][a] = (i < m && a < kk) ? l[(b * m + i) * kk + a] : 0.f;
    r_tile[row][a] = (j < n && a < kk) ? r[(b * n + j) * kk + a] : 0.f;
  }
  __syncthreads();
  const int64_t j = j0 + tx;
  if (j >= n) return;
#pragma unroll
  for (int pass = 0; pass < kTile / kTileRowsPerPass; ++pass) {
    const int row = ty + kTileRowsPerPass * pass;
    const int64_t i = i0 + row;
    if (i < m) {
      float s = 0.f;
#pragma unroll
      for (int a = 0; a < KT; ++a) s += l_tile[row][a] * r_tile[tx][a];
      TG* p = g + (b * m + i) * n + j;
      *p = from_float<TG>(to_float(*p) - s);
    }
  }
}

// ---------------------------------------------------------------- dispatch helpers
template <typename TG, typename TB>
cudaError_t launch_left(const void* g, const void* u, float* partial, int64_t batch,
                        int64_t m, int64_t n, int64_t k, int64_t rows_per_chunk,
                        cudaStream_t stream) {
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  dim3 grid(static_cast<unsigned>((n + kColsPerBlock - 1) / kColsPerBlock),
            static_cast<unsigned>(batch), static_cast<unsigned>(chunks));
  const TG* gp = static_cast<const TG*>(g);
  const TB* up = static_cast<const TB*>(u);
  if (k <= 16) {
    left_reduce_kernel<TG, TB, 16><<<grid, kColsPerBlock, 0, stream>>>(
        gp, up, partial, batch, m, n, static_cast<int>(k), rows_per_chunk);
  } else {
    left_reduce_kernel<TG, TB, 32><<<grid, kColsPerBlock, 0, stream>>>(
        gp, up, partial, batch, m, n, static_cast<int>(k), rows_per_chunk);
  }
  return cudaGetLastError();
}

template <typename TG, typename TB>
cudaError_t launch_right(const void* g, const void* v, float* out, int64_t batch, int64_t m,
                         int64_t n, int64_t k, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>((m + kRowsPerBlock - 1) / kRowsPerBlock),
            static_cast<unsigned>(batch));
  dim3 block(kWarp, kRowsPerBlock);
  const TG* gp = static_cast<const TG*>(g);
  const TB* vp = static_cast<const TB*>(v);
  if (k <= 16) {
    right_reduce_kernel<TG, TB, 16><<<grid, block, 0, stream>>>(gp, vp, out, m, n,
                                                                static_cast<int>(k));
  } else {
    right_reduce_kernel<TG, TB, 32><<<grid, block, 0, stream>>>(gp, vp, out, m, n,
                                                                static_cast<int>(k));
  }
  return cudaGetLastError();
}

template <typename TG>
cudaError_t launch_update(void* g, const float* l, const float* r, int64_t batch, int64_t m,
                          int64_t n, int64_t kk, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>((n + kTile - 1) / kTile),
            static_cast<unsigned>((m + kTile - 1) / kTile), static_cast<unsigned>(batch));
  dim3 block(kTile, kTileRowsPerPass);
  TG* gp = static_cast<TG*>(g);
  if (kk <= 32) {
    rank_update_kernel<TG, 32><<<grid, block, 0, stream>>>(gp, l, r, m, n,
                                                           static_cast<int>(kk));
  } else {
    rank_update_kernel<TG, 64><<<grid, block, 0, stream>>>(gp, l, r, m, n,
                                                           static_cast<int>(kk));
  }
  return cudaGetLastError();
}

bool valid(int64_t batch, int64_t m, int64_t n, int64_t k, int64_t max_k) {
  return batch > 0 && batch <= 65535 && m > 0 && n > 0 && k > 0 && k <= max_k;
}

}  // namespace

// Supported (gradient, basis) dtype pairs: basis fp32, or the gradient's own dtype.
#define CL_DISPATCH_PAIR(G_DTYPE, B_DTYPE, CALL)                                   \
  do {                                                                            \
    if ((G_DTYPE) == CL_DTYPE_F32 && (B_DTYPE) == CL_DTYPE_F32) return CALL(float, float);    \
    if ((G_DTYPE) == CL_DTYPE_F16 && (B_DTYPE) == CL_DTYPE_F32) return CALL(__half, float);   \
    if ((G_DTYPE) == CL_DTYPE_F16 && (B_DTYPE) == CL_DTYPE_F16) return CALL(__half, __half);  \
    if ((G_DTYPE) == CL_DTYPE_BF16 && (B_DTYPE) == CL_DTYPE_F32)                  \
      return CALL(__nv_bfloat16, float);                                          \
    if ((G_DTYPE) == CL_DTYPE_BF16 && (B_DTYPE) == CL_DTYPE_BF16)                 \
      return CALL(__nv_bfloat16, __nv_bfloat16);                                  \
    return static_cast<int>(cudaErrorInvalidValue);                               \
  } while (0)

extern "C" int cl_left_reduce(const void* g, int g_dtype, const void* u, int basis_dtype,
                              float* partial, int64_t batch, int64_t m, int64_t n, int64_t k,
                              int64_t rows_per_chunk, void* stream) {
  if (!valid(batch, m, n, k, CL_FUSED_MAX_K) || rows_per_chunk <= 0 ||
      (m + rows_per_chunk - 1) / rows_per_chunk > 65535) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define CL_LEFT(TG, TB) \
  static_cast<int>(launch_left<TG, TB>(g, u, partial, batch, m, n, k, rows_per_chunk, s))
  CL_DISPATCH_PAIR(g_dtype, basis_dtype, CL_LEFT);
#undef CL_LEFT
}

extern "C" int cl_right_reduce(const void* g, int g_dtype, const void* v, int basis_dtype,
                               float* out, int64_t batch, int64_t m, int64_t n, int64_t k,
                               void* stream) {
  if (!valid(batch, m, n, k, CL_FUSED_MAX_K)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define CL_RIGHT(TG, TB) \
  static_cast<int>(launch_right<TG, TB>(g, v, out, batch, m, n, k, s))
  CL_DISPATCH_PAIR(g_dtype, basis_dtype, CL_RIGHT);
#undef CL_RIGHT
}

extern "C" int cl_rank_update(void* g, int g_dtype, const float* l, const float* r,
                              int64_t batch, int64_t m, int64_t n, int64_t kk, void* stream) {
  if (!valid(batch, m, n, kk, CL_UPDATE_MAX_K)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (g_dtype) {
    case CL_DTYPE_F32:
      return static_cast<int>(launch_update<float>(g, l, r, batch, m, n, kk, s));
    case CL_DTYPE_F16:
      return static_cast<int>(launch_update<__half>(g, l, r, batch, m, n, kk, s));
    case CL_DTYPE_BF16:
      return static_cast<int>(launch_update<__nv_bfloat16>(g, l, r, batch, m, n, kk, s));
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
