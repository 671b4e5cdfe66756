// cl_runner extension: gradient projection for svd_orthogonal (the `cpp` backend).
//
// Schemas live here (TORCH_LIBRARY); the ATen implementation below is registered for
// CPU and CUDA (ATen's batched GEMMs: MKL/OpenBLAS on CPU, cuBLAS on CUDA). The fused
// CUDA kernels (`cuda` backend) are registered in projection_cuda.cpp when built with CUDA.
// The math is cl_runner/ops/reference.py's, line for line; the tests hold both to it.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "projection.h"

namespace cl_runner {

namespace {

at::ScalarType compute_type(at::ScalarType t) {
  // fp32 math for fp32/bf16/fp16 gradients; fp64 stays fp64.
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void apply_left_(at::Tensor& work, const at::Tensor& left, bool complement) {
  at::Tensor t = at::bmm(left.transpose(1, 2), work);  // (B, k, n)
  if (complement) {
    at::bmm_out(work, left, t);  // U_c (U_c^T G)
  } else {
    work.baddbmm_(left, t, /*beta=*/1.0, /*alpha=*/-1.0);  // G - U (U^T G)
  }
}

void apply_right_(at::Tensor& work, const at::Tensor& right, bool complement) {
  at::Tensor t = at::bmm(work, right);  // (B, m, k)
  if (complement) {
    at::bmm_out(work, t, right.transpose(1, 2));
  } else {
    work.baddbmm_(t, right.transpose(1, 2), 1.0, -1.0);
  }
}

// (I - U U^T) work (I - V V^T). A side stored as a complement is contracted first (work
// V_c is only m x (n - k)) and the other side projected on that small product.
void project_two_sided_(at::Tensor& work, const std::optional<at::Tensor>& left,
                        const std::optional<at::Tensor>& right, bool left_complement,
                        bool right_complement) {
  bool right_first = right && right_complement;
  bool left_first = left && left_complement;
  if (right_first && left_first) {  // both complements: contract the cheaper side first
    const int64_t m = work.size(1), n = work.size(2);
    const int64_t kl = left->size(2), kr = right->size(2);
    right_first = m * n * kr + m * kl * kr <= m * n * kl + n * kl * kr;
    left_first = !right_first;
  }
  if (right_first) {
    at::Tensor t = at::bmm(work, *right);  // (B, m, k_c)
    if (left) apply_left_(t, *left, left_complement);
    at::bmm_out(work, t, right->transpose(1, 2));
  } else if (left_first) {
    at::Tensor t = at::bmm(left->transpose(1, 2), work);  // (B, k_c, n)
    if (right) apply_right_(t, *right, right_complement);
    at::bmm_out(work, *left, t);
  } else {
    if (left) apply_left_(work, *left, false);
    if (right) apply_right_(work, *right, false);
  }
}

// U U^T x; with the complement, x - U_c U_c^T x.
at::Tensor left_preserved(const at::Tensor& x, const at::Tensor& left, bool complement) {
  at::Tensor t = at::bmm(left, at::bmm(left.transpose(1, 2), x));
  return complement ? x - t : t;
}

void project_high_block_(at::Tensor& work, const std::optional<at::Tensor>& left,
                         const std::optional<at::Tensor>& right, bool left_complement,
                         bool right_complement) {
  if (!left && !right) return;
  if (right && !right_complement) {
    // Keep the block factored on the right: work V is only (B, m, k_r).
    at::Tensor block = at::bmm(work, *right);
    if (left) block = left_preserved(block, *left, left_complement);
    work.baddbmm_(block, right->transpose(1, 2), 1.0, -1.0);
    return;
  }
  at::Tensor block = right ? work - at::bmm(at::bmm(work, *right), right->transpose(1, 2))
                           : work.clone();
  if (left) block = left_preserved(block, *left, left_complement);
  work.sub_(block);
}

void check_basis(const at::Tensor& grads, const at::Tensor& basis, int64_t dim,
                 const char* side, const char* dim_name) {
  TORCH_CHECK(basis.dim() == 3 && basis.size(0) == grads.size(0) && basis.size(1) == dim,
              side, " has shape ", basis.sizes(), " but grads are ", grads.sizes(),
              ": the stacked basis must be (B, ", dim_name, ", k) = (", grads.size(0), ", ",
              dim, ", k) with orthonormal columns");
  TORCH_CHECK(basis.size(2) <= dim, side, " has k=", basis.size(2), " columns > ", dim_name,
              "=", dim, ": an orthonormal basis has at most as many columns as rows");
  TORCH_CHECK(basis.device() == grads.device(), side, " is on ", basis.device(),
              " but grads on ", grads.device(), "; move the bases to the gradients' device");
  TORCH_CHECK(at::isFloatingType(basis.scalar_type()), side, " has dtype ",
              basis.scalar_type(), "; bases must be floating point");
}

}  // namespace

void check_stacked_args(const at::Tensor& grads, const std::optional<at::Tensor>& left,
                        const std::optional<at::Tensor>& right, c10::string_view mode) {
  TORCH_CHECK(mode == "two_sided" || mode == "high_block", "mode='", std::string(mode),
              "' is not a projection mode; use 'two_sided' or 'high_block'");
  TORCH_CHECK(grads.dim() == 3, "grads must be a stack (B, m, n); got shape ", grads.sizes());
  TORCH_CHECK(at::isFloatingType(grads.scalar_type()), "grads have dtype ",
              grads.scalar_type(), "; gradients must be floating point");
  if (left) check_basis(grads, *left, grads.size(1), "left basis", "m");
  if (right) check_basis(grads, *right, grads.size(2), "right basis", "n");
}

void project_stacked_aten_(at::Tensor grads, const std::optional<at::Tensor>& left,
                           const std::optional<at::Tensor>& right, bool left_complement,
                           bool right_complement, c10::string_view mode) {
  check_stacked_args(grads, left, right, mode);
  if (grads.numel() == 0 || (!left && !right)) return;
  const auto dtype = compute_type(grads.scalar_type());
  const bool inplace = grads.scalar_type() == dtype && grads.is_contiguous();
  at::Tensor work = inplace ? grads : grads.to(dtype).contiguous();
  std::optional<at::Tensor> l, r;
  if (left) l = left->to(dtype);
  if (right) r = right->to(dtype);
  if (mode == "two_sided") {
    project_two_sided_(work, l, r, left_complement, right_complement);
  } else {
    project_high_block_(work, l, r, left_complement, right_complement);
  }
  if (!inplace) grads.copy_(work);
}

namespace {

// Stack (dim, k_i) bases into (B, dim, max k) with zero columns after each (exact).
at::Tensor stack_padded(const std::vector<at::Tensor>& bases, at::ScalarType dtype) {
  int64_t width = 0;
  for (const auto& b : bases) width = std::max<int64_t>(width, b.size(1));
  at::Tensor out = at::zeros({static_cast<int64_t>(bases.size()), bases[0].size(0), width},
                             bases[0].options().dtype(dtype));
  for (size_t i = 0; i < bases.size(); ++i) {
    out[static_cast<int64_t>(i)].narrow(1, 0, bases[i].size(1)).copy_(bases[i]);
  }
  return out;
}

using GroupKey = std::tuple<std::vector<int64_t>, int, std::string, bool, bool, bool, bool>;

}  // namespace

void project_list_impl_(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& left,
                        const c10::List<std::optional<at::Tensor>>& right,
                        const c10::List<bool>& left_complement,
                        const c10::List<bool>& right_complement, c10::string_view mode,
                        const StackedFn& project_stacked, bool keep_grad_dtype) {
  const size_t n = grads.size();
  TORCH_CHECK(left.size() == n && right.size() == n && left_complement.size() == n &&
                  right_complement.size() == n,
              "project_list_: got ", n, " grads, ", left.size(), " left bases, ", right.size(),
              " right bases, ", left_complement.size(), " and ", right_complement.size(),
              " complement flags; pass one of each per gradient");
  // std::map keeps the group order deterministic.
  std::map<GroupKey, std::vector<size_t>> groups;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.dim() == 2, "grads[", i, "] has shape ", g.sizes(),
                "; project_ takes matrices (reshape to 2-D first)");
    const std::optional<at::Tensor> l = left.get(i), r = right.get(i);
    for (int side = 0; side < 2; ++side) {
      const std::optional<at::Tensor>& b = side == 0 ? l : r;
      if (!b) continue;
      const int64_t dim = g.size(side);
      const char* name = side == 0 ? "left_bases" : "right_bases";
      TORCH_CHECK(b->dim() == 2 && b->size(0) == dim, name, "[", i, "] has shape ",
                  b->sizes(), " but grads[", i, "] is ", g.sizes(), ": the basis must be (",
                  dim, ", k) with orthonormal columns");
      TORCH_CHECK(b->size(1) <= dim, name, "[", i, "] has k=", b->size(1), " columns > ",
                  dim, ": an orthonormal basis has at most as many columns as rows");
      TORCH_CHECK(b->device() == g.device(), name, "[", i, "] is on ", b->device(),
                  " but grads[", i, "] on ", g.device());
    }
    GroupKey key{g.sizes().vec(), static_cast<int>(g.scalar_type()), g.device().str(),
                 l.has_value(), r.has_value(), left_complement.get(i),
                 right_complement.get(i)};
    groups[key].push_back(i);
  }
  for (const auto& [key, idx] : groups) {
    const bool has_left = std::get<3>(key), has_right = std::get<4>(key);
    if (!has_left && !has_right) continue;
    std::vector<at::Tensor> members, lefts, rights;
    for (size_t i : idx) {
      members.push_back(grads[i]);
      if (has_left) lefts.push_back(*left.get(i));
      if (has_right) rights.push_back(*right.get(i));
    }
    // One pass: stack and convert together (the fused CUDA path reads bf16/fp16 as is).
    const auto basis_dtype = compute_type(members[0].scalar_type());
    at::Tensor stack = at::empty(
        {static_cast<int64_t>(idx.size()), members[0].size(0), members[0].size(1)},
        members[0].options().dtype(keep_grad_dtype ? members[0].scalar_type() : basis_dtype));
    for (size_t j = 0; j < idx.size(); ++j) stack[static_cast<int64_t>(j)].copy_(members[j]);
    std::optional<at::Tensor> l, r;
    if (has_left) l = stack_padded(lefts, basis_dtype);
    if (has_right) r = stack_padded(rights, basis_dtype);
    project_stacked(stack, l, r, std::get<5>(key), std::get<6>(key), mode);
    for (size_t j = 0; j < idx.size(); ++j) members[j].copy_(stack[static_cast<int64_t>(j)]);
  }
}

void project_list_aten_(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& left,
                        const c10::List<std::optional<at::Tensor>>& right,
                        const c10::List<bool>& left_complement,
                        const c10::List<bool>& right_complement, c10::string_view mode) {
  project_list_impl_(grads, left, right, left_complement, right_complement, mode,
                     project_stacked_aten_, /*keep_grad_dtype=*/false);
}

bool has_cuda_kernels() {
#ifdef CL_RUNNER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(cl_runner, m) {
  m.def(
      "project_stacked_(Tensor(a!) grads, Tensor? left, Tensor? right, bool left_complement, "
      "bool right_complement, str projection) -> ()");
  m.def(
      "project_list_(Tensor(a!)[] grads, Tensor?[] left, Tensor?[] right, "
      "bool[] left_complement, bool[] right_complement, str projection) -> ()");
  // The `cuda` backend: same schemas, kernels only for CUDA tensors.
  m.def(
      "project_stacked_fused_(Tensor(a!) grads, Tensor? left, Tensor? right, "
      "bool left_complement, bool right_complement, str projection) -> ()");
  m.def(
      "project_list_fused_(Tensor(a!)[] grads, Tensor?[] left, Tensor?[] right, "
      "bool[] left_complement, bool[] right_complement, str projection) -> ()");
  m.def("has_cuda_kernels() -> bool", &has_cuda_kernels);
}

TORCH_LIBRARY_IMPL(cl_runner, CPU, m) {
  m.impl("project_stacked_", &project_stacked_aten_);
  m.impl("project_list_", &project_list_aten_);
}

TORCH_LIBRARY_IMPL(cl_runner, CUDA, m) {
  m.impl("project_stacked_", &project_stacked_aten_);
  m.impl("project_list_", &project_list_aten_);
}

}  // namespace cl_runner

// `import cl_runner.ops._C` only needs to load this library so the registrations above
// run; the module itself is empty (no pybind11, which keeps the build short).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
