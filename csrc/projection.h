// Shared declarations between the ATen implementation (projection.cpp) and the CUDA
// glue (projection_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>

namespace cl_runner {

using StackedFn = std::function<void(at::Tensor, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&, bool, bool,
                                     c10::string_view)>;

void check_stacked_args(const at::Tensor& grads, const std::optional<at::Tensor>& left,
                        const std::optional<at::Tensor>& right, c10::string_view mode);

// The reference math with ATen batched GEMMs; any device.
void project_stacked_aten_(at::Tensor grads, const std::optional<at::Tensor>& left,
                           const std::optional<at::Tensor>& right, bool left_complement,
                           bool right_complement, c10::string_view mode);

// Groups same-shape matrices, stacks them (in the compute dtype unless
// keep_grad_dtype), pads bases to a common k and runs `project_stacked` per group.
void project_list_impl_(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& left,
                        const c10::List<std::optional<at::Tensor>>& right,
                        const c10::List<bool>& left_complement,
                        const c10::List<bool>& right_complement, c10::string_view mode,
                        const StackedFn& project_stacked, bool keep_grad_dtype);

}  // namespace cl_runner
