// The `cuda` backend: launches the kernels of projection_kernels.cu (through their C ABI)
// for the cases they are built for, and cuBLAS (project_stacked_aten_) for the rest.
// Built only into the CUDAExtension (setup.py defines CL_RUNNER_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>

#include "projection.h"
#include "projection_kernels.h"

namespace cl_runner {

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CL_DTYPE_F32;
    case at::kHalf: return CL_DTYPE_F16;
    case at::kBFloat16: return CL_DTYPE_BF16;
    default: return -1;
  }
}

void check_launch(int err, const char* kernel) {
  TORCH_CHECK(err == 0, "cl_runner CUDA kernel ", kernel, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// The kernels read bases in fp32 or in the gradient's own dtype; convert anything else.
at::Tensor kernel_basis(const at::Tensor& basis, at::ScalarType grad_type) {
  const auto t = basis.scalar_type();
  if (t == at::kFloat || t == grad_type) return basis.contiguous();
  return basis.to(at::kFloat).contiguous();
}

// Fused kernels: small k, no complement, contiguous fp32/fp16/bf16 gradients. Everything
// else (large k is compute-bound, where cuBLAS is better) goes to the ATen path.
bool fused_applies(const at::Tensor& grads, const std::optional<at::Tensor>& left,
                   const std::optional<at::Tensor>& right, bool left_complement,
                   bool right_complement) {
  if (!grads.is_cuda() || !grads.is_contiguous() || dtype_code(grads.scalar_type()) < 0) {
    return false;
  }
  if (left_complement || right_complement || grads.size(0) > 65535) return false;
  if (left && left->size(2) > CL_FUSED_MAX_K) return false;
  if (right && right->size(2) > CL_FUSED_MAX_K) return false;
  return true;
}

// U^T G -> (B, k, n) fp32
at::Tensor left_reduce(const at::Tensor& grads, const at::Tensor& u, cudaStream_t stream) {
  const int64_t batch = grads.size(0), m = grads.size(1), n = grads.size(2), k = u.size(2);
  // Split rows over enough chunks to give the GPU ~128k threads when B * n is small.
  const int64_t want_chunks = std::max<int64_t>(1, (131072 + batch * n - 1) / (batch * n));
  int64_t rows_per_chunk = std::max<int64_t>(32, (m + want_chunks - 1) / want_chunks);
  rows_per_chunk = std::max<int64_t>(rows_per_chunk, (m + 65534) / 65535);
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor partial = at::empty({chunks, batch, k, n}, grads.options().dtype(at::kFloat));
  check_launch(cl_left_reduce(grads.data_ptr(), dtype_code(grads.scalar_type()),
                              u.data_ptr(), dtype_code(u.scalar_type()),
                              partial.data_ptr<float>(), batch, m, n, k, rows_per_chunk,
                              stream),
               "left_reduce");
  return chunks == 1 ? partial[0] : partial.sum(0);
}

// G V -> (B, m, k) fp32
at::Tensor right_reduce(const at::Tensor& grads, const at::Tensor& v, cudaStream_t stream) {
  const int64_t batch = grads.size(0), m = grads.size(1), n = grads.size(2), k = v.size(2);
  at::Tensor out = at::empty({batch, m, k}, grads.options().dtype(at::kFloat));
  check_launch(cl_right_reduce(grads.data_ptr(), dtype_code(grads.scalar_type()),
                               v.data_ptr(), dtype_code(v.scalar_type()),
                               out.data_ptr<float>(), batch, m, n, k, stream),
               "right_reduce");
  return out;
}

// G -= L R^T with L (B, m, K), R (B, n, K) fp32.
void rank_update(at::Tensor& grads, const at::Tensor& l, const at::Tensor& r,
                 cudaStream_t stream) {
  const at::Tensor lc = l.contiguous(), rc = r.contiguous();
  check_launch(cl_rank_update(grads.data_ptr(), dtype_code(grads.scalar_type()),
                              lc.data_ptr<float>(), rc.data_ptr<float>(), grads.size(0),
                              grads.size(1), grads.size(2), lc.size(2), stream),
               "rank_update");
}

}  // namespace

void project_stacked_fused_(at::Tensor grads, const std::optional<at::Tensor>& left_in,
                            const std::optional<at::Tensor>& right_in, bool left_complement,
                            bool right_complement, c10::string_view projection) {
  check_stacked_args(grads, left_in, right_in, projection);
  if (grads.numel() == 0 || (!left_in && !right_in)) return;
  if (!fused_applies(grads, left_in, right_in, left_complement, right_complement)) {
    project_stacked_aten_(grads, left_in, right_in, left_complement, right_complement,
                          projection);
    return;
  }
  const bool two_sided = projection == "two_sided";
  std::optional<at::Tensor> left = left_in, right = right_in;
  // k = 0: two_sided has nothing to remove on that side; high_block's block is empty.
  if (left && left->size(2) == 0) {
    if (!two_sided) return;
    left.reset();
  }
  if (right && right->size(2) == 0) {
    if (!two_sided) return;
    right.reset();
  }
  if (!left && !right) return;

  const c10::cuda::CUDAGuard guard(grads.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto gtype = grads.scalar_type();
  std::optional<at::Tensor> u, v, u32, v32;
  if (left) {
    u = kernel_basis(*left, gtype);
    u32 = left->to(at::kFloat);
  }
  if (right) {
    v = kernel_basis(*right, gtype);
    v32 = right->to(at::kFloat);
  }

  if (left && !right) {  // G -= U (U^T G)   (both modes)
    at::Tensor t1 = left_reduce(grads, *u, stream);
    rank_update(grads, *u32, t1.transpose(1, 2), stream);
    return;
  }
  if (right && !left) {  // G -= (G V) V^T   (both modes)
    rank_update(grads, right_reduce(grads, *v, stream), *v32, stream);
    return;
  }
  if (!two_sided) {  // high_block: G -= U (U^T (G V)) V^T
    at::Tensor t2 = right_reduce(grads, *v, stream);
    at::Tensor core = at::bmm(u32->transpose(1, 2), t2);  // (B, k_l, k_r)
    rank_update(grads, at::bmm(*u32, core), *v32, stream);
    return;
  }
  // two_sided: G -= U (T1 - (T1 V) V^T) + T2 V^T, as one rank-(k_l + k_r) update.
  at::Tensor t1 = left_reduce(grads, *u, stream);   // (B, k_l, n)
  at::Tensor t2 = right_reduce(grads, *v, stream);  // (B, m, k_r)
  t1.baddbmm_(at::bmm(t1, *v32), v32->transpose(1, 2), 1.0, -1.0);
  rank_update(grads, at::cat({*u32, t2}, 2), at::cat({t1.transpose(1, 2), *v32}, 2), stream);
}

void project_list_fused_(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& left,
                         const c10::List<std::optional<at::Tensor>>& right,
                         const c10::List<bool>& left_complement,
                         const c10::List<bool>& right_complement, c10::string_view projection) {
  project_list_impl_(grads, left, right, left_complement, right_complement, projection,
                     project_stacked_fused_, /*keep_grad_dtype=*/true);
}

TORCH_LIBRARY_IMPL(cl_runner, CUDA, m) {
  m.impl("project_stacked_fused_", &project_stacked_fused_);
  m.impl("project_list_fused_", &project_list_fused_);
}

}  // namespace cl_runner
