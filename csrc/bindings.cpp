// Python bindings of dpkernels._C: validation of every input, device guard, dtype mapping, launch.
//
// gate_forward / gate_backward, scatter_apply / scatter_restore and sddmm take the arguments of the
// dpkernels.reference functions of those names (dpkernels/backends/cuda.py normalises the seed to
// [0, 2**64) and makes inputs contiguous, as the Triton launchers do). Bad input raises TypeError
// (dtype), ValueError (shape, layout, device, range) or RuntimeError (CUDA), never reaches a
// kernel. Dtypes, shapes and layout are checked before devices, so CPU-only CI exercises those
// checks too. What the sparse kernels trust about device data (indices, the pointer table) is
// said in scatter.cu / sddmm.cu; the Python layer checks it (with a host sync) when a diff or mask
// is built, not on every launch.
//
// CPU test hooks compile gates.cuh / philox.cuh / scatter.cuh (the kernels' own __host__ __device__
// code) with the host compiler: philox4x32, philox_uniform (CPU or CUDA offsets), hard_concrete_cpu,
// scatter_merge_cpu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "gates.cuh"
#include "launchers.h"
#include "philox.cuh"
#include "scatter.cuh"

namespace dpkernels {
namespace {

ElemType elem_type(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return ElemType::kFloat32;
    case at::kDouble:
      return ElemType::kFloat64;
    case at::kHalf:
      return ElemType::kFloat16;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float64, float16 or bfloat16, got ", t);
  }
}

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name = "log_alpha") {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), ", ", ref_name, " has ", ref.sizes());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_on_device_of(const at::Tensor& t, const at::Tensor& ref, const char* name,
                        const char* ref_name = "log_alpha") {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got a ", t.device().type(), " tensor");
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), ", ", ref_name, " on ", ref.device());
}

void check_1d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
}

void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                   " must be int32 or int64, got ", t.scalar_type());
}

void check_offset(int64_t offset, int64_t n) {
  TORCH_CHECK_VALUE(offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - n,
                    "offset must satisfy 0 <= offset and offset + numel <= 2**63 - 1, got ", offset);
}

GateParams gate_params(bool training, double l, double r, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(l) && std::isfinite(r) && std::isfinite(beta) && l < 0 && r > 1 && beta > 0,
                    "gate constants need l < 0 < 1 < r and beta > 0 (all finite), got l=", l, ", r=", r,
                    ", beta=", beta);
  return GateParams{static_cast<float>(l), static_cast<float>(r), static_cast<float>(beta), training};
}

// A few waves of the device: the grid-stride loops cover the rest.
int max_blocks_for_current_device() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms * 8;
}

// err comes from cudaGetLastError right after the launch (which also cleared it).
void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err != cudaErrorNoKernelImageForDevice, "dpkernels._C.", op,
              ": this build has no kernel for this GPU's architecture; rebuild with DPKERNELS_CUDA_ARCHS set to "
              "include it (e.g. DPKERNELS_CUDA_ARCHS=\"80;90\")");
  C10_CUDA_CHECK(err);
}

at::Tensor gate_forward(const at::Tensor& log_alpha, uint64_t seed, int64_t offset, bool training, double l, double r,
                        double beta, const std::optional<at::Tensor>& theta0, const std::optional<at::Tensor>& diff,
                        std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(theta0.has_value() == diff.has_value(), "pass both theta0 and diff, or neither");
  check_dtype(log_alpha, at::kFloat, "log_alpha");
  check_contiguous(log_alpha, "log_alpha");
  const GateParams params = gate_params(training, l, r, beta);
  const int64_t n = log_alpha.numel();
  if (theta0.has_value()) {
    elem_type(theta0->scalar_type(), "theta0");
    check_dtype(*diff, at::kFloat, "diff");
    if (out_dtype.has_value()) elem_type(*out_dtype, "out_dtype");
    check_like(*theta0, log_alpha, "theta0");
    check_like(*diff, log_alpha, "diff");
    check_contiguous(*theta0, "theta0");
    check_contiguous(*diff, "diff");
  }
  check_offset(offset, n);
  check_on_device_of(log_alpha, log_alpha, "log_alpha");
  if (theta0.has_value()) {
    check_on_device_of(*theta0, log_alpha, "theta0");
    check_on_device_of(*diff, log_alpha, "diff");
  }

  const c10::cuda::CUDAGuard guard(log_alpha.device());
  if (!theta0.has_value()) {
    at::Tensor z = at::empty_like(log_alpha);
    if (n) {
      check_launch(launch_gate_forward(log_alpha.data_ptr<float>(), ElemType::kFloat32, nullptr, nullptr,
                                       ElemType::kFloat32, z.data_ptr(), n, seed, static_cast<uint64_t>(offset),
                                       params, max_blocks_for_current_device(),
                                       c10::cuda::getCurrentCUDAStream()),
                   "gate_forward");
    }
    return z;
  }
  const at::ScalarType out_type = out_dtype.value_or(theta0->scalar_type());
  at::Tensor out = at::empty(log_alpha.sizes(), log_alpha.options().dtype(out_type));
  if (n) {
    check_launch(launch_gate_forward(log_alpha.data_ptr<float>(), elem_type(theta0->scalar_type(), "theta0"),
                                     theta0->data_ptr(), diff->data_ptr<float>(), elem_type(out_type, "out_dtype"),
                                     out.data_ptr(), n, seed, static_cast<uint64_t>(offset), params,
                                     max_blocks_for_current_device(), c10::cuda::getCurrentCUDAStream()),
                 "gate_forward");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_backward(const at::Tensor& g, const at::Tensor& diff,
                                                 const at::Tensor& log_alpha, uint64_t seed, int64_t offset,
                                                 bool training, double l, double r, double beta, double l0_lambda,
                                                 const std::optional<at::Tensor>& grad_diff,
                                                 const std::optional<at::Tensor>& grad_log_alpha) {
  const bool accumulate = grad_diff.has_value();
  TORCH_CHECK_VALUE(accumulate == grad_log_alpha.has_value(),
                    "pass both grad_diff and grad_log_alpha to accumulate, or neither");
  const ElemType g_type = elem_type(g.scalar_type(), "g");
  check_dtype(diff, at::kFloat, "diff");
  check_dtype(log_alpha, at::kFloat, "log_alpha");
  if (accumulate) {
    check_dtype(*grad_diff, at::kFloat, "grad_diff");
    check_dtype(*grad_log_alpha, at::kFloat, "grad_log_alpha");
  }
  check_like(g, log_alpha, "g");
  check_like(diff, log_alpha, "diff");
  if (accumulate) {
    check_like(*grad_diff, log_alpha, "grad_diff");
    check_like(*grad_log_alpha, log_alpha, "grad_log_alpha");
  }
  check_contiguous(g, "g");
  check_contiguous(diff, "diff");
  check_contiguous(log_alpha, "log_alpha");
  if (accumulate) {
    check_contiguous(*grad_diff, "grad_diff");
    check_contiguous(*grad_log_alpha, "grad_log_alpha");
  }
  const GateParams params = gate_params(training, l, r, beta);
  TORCH_CHECK_VALUE(std::isfinite(l0_lambda), "l0_lambda must be finite, got ", l0_lambda);
  const int64_t n = log_alpha.numel();
  check_offset(offset, n);
  check_on_device_of(log_alpha, log_alpha, "log_alpha");
  check_on_device_of(g, log_alpha, "g");
  check_on_device_of(diff, log_alpha, "diff");
  if (accumulate) {
    check_on_device_of(*grad_diff, log_alpha, "grad_diff");
    check_on_device_of(*grad_log_alpha, log_alpha, "grad_log_alpha");
  }

  const c10::cuda::CUDAGuard guard(log_alpha.device());
  at::Tensor gd = accumulate ? *grad_diff : at::empty_like(diff);
  at::Tensor gla = accumulate ? *grad_log_alpha : at::empty_like(log_alpha);
  if (n) {
    // beta log(-l / r) in double, rounded to fp32 once, as the Triton launcher passes it.
    const float l0_shift = static_cast<float>(beta * std::log(-l / r));
    check_launch(launch_gate_backward(g_type, g.data_ptr(), diff.data_ptr<float>(), log_alpha.data_ptr<float>(),
                                      gd.data_ptr<float>(), gla.data_ptr<float>(), n, seed,
                                      static_cast<uint64_t>(offset), params, l0_lambda != 0.0,
                                      static_cast<float>(l0_lambda), l0_shift, accumulate,
                                      max_blocks_for_current_device(), c10::cuda::getCurrentCUDAStream()),
                 "gate_backward");
  }
  return {gd, gla};
}

// ---------------------------------------------------------------------------------------------
// Sparse ops: the one-launch scatter (apply / restore) and the sampled weight gradient (sddmm)
// ---------------------------------------------------------------------------------------------

// The layout shared by scatter_apply and scatter_restore (dpkernels.reference.scatter_apply's
// arguments), checked as far as the host can without reading device memory: dtypes, 1-D
// contiguous streams of one length n, `starts` a partition of [0, n) over the targets with no
// tensor given more entries than it has elements, every target contiguous in saved's dtype, then
// every tensor on saved's device. What stays trusted (table[t] == targets[t].data_ptr(), ids
// consistent with starts, index in range and unique per tensor) is listed in scatter.cu.
struct ScatterLayout {
  ElemType type;
  bool index64;
  int64_t n;
};

ScatterLayout check_scatter(const std::vector<at::Tensor>& targets, const at::Tensor& table, const at::Tensor& ids,
                            const at::Tensor& index, const at::Tensor* values, const std::vector<int64_t>& starts,
                            const at::Tensor& saved) {
  const ElemType type = elem_type(saved.scalar_type(), "saved");
  check_dtype(table, at::kLong, "table");
  check_dtype(ids, at::kInt, "ids");
  check_index_dtype(index, "index");
  if (values != nullptr) check_dtype(*values, at::kFloat, "values");
  for (size_t t = 0; t < targets.size(); ++t) {
    TORCH_CHECK_TYPE(targets[t].scalar_type() == saved.scalar_type(), "targets[", t, "] is ",
                     targets[t].scalar_type(), ", saved is ", saved.scalar_type(), " (one launch takes one dtype)");
  }
  check_1d(saved, "saved");
  check_1d(table, "table");
  check_1d(ids, "ids");
  check_1d(index, "index");
  if (values != nullptr) check_1d(*values, "values");
  const int64_t n = saved.numel();
  check_like(ids, saved, "ids", "saved");
  check_like(index, saved, "index", "saved");
  if (values != nullptr) check_like(*values, saved, "values", "saved");
  TORCH_CHECK_VALUE(static_cast<int64_t>(targets.size()) == table.numel(), "table has ", table.numel(),
                    " pointers for ", targets.size(), " targets");
  TORCH_CHECK_VALUE(!starts.empty() && starts.size() <= targets.size() + 1,
                    "starts must hold 1 to len(targets) + 1 = ", targets.size() + 1, " offsets, got ", starts.size());
  TORCH_CHECK_VALUE(starts.front() == 0 && starts.back() == n, "starts must run from 0 to the ", n,
                    " entries, got ", starts.front(), " .. ", starts.back());
  for (size_t t = 0; t + 1 < starts.size(); ++t) {
    TORCH_CHECK_VALUE(starts[t] <= starts[t + 1], "starts must be non-decreasing, got ", starts[t], " then ",
                      starts[t + 1], " at position ", t);
    TORCH_CHECK_VALUE(starts[t + 1] - starts[t] <= targets[t].numel(), "targets[", t, "] has ",
                      targets[t].numel(), " elements but ", starts[t + 1] - starts[t], " entries");
  }
  check_contiguous(saved, "saved");
  check_contiguous(table, "table");
  check_contiguous(ids, "ids");
  check_contiguous(index, "index");
  if (values != nullptr) check_contiguous(*values, "values");
  for (size_t t = 0; t < targets.size(); ++t) {
    TORCH_CHECK_VALUE(targets[t].is_contiguous(), "targets[", t, "] must be contiguous");
  }
  check_on_device_of(saved, saved, "saved", "saved");
  check_on_device_of(table, saved, "table", "saved");
  check_on_device_of(ids, saved, "ids", "saved");
  check_on_device_of(index, saved, "index", "saved");
  if (values != nullptr) check_on_device_of(*values, saved, "values", "saved");
  for (size_t t = 0; t < targets.size(); ++t) {
    TORCH_CHECK_VALUE(targets[t].device() == saved.device(), "targets[", t, "] is on ", targets[t].device(),
                      ", saved on ", saved.device());
  }
  return ScatterLayout{type, index.scalar_type() == at::kLong, n};
}

at::Tensor scatter_apply(const std::vector<at::Tensor>& targets, const at::Tensor& table, const at::Tensor& ids,
                         const at::Tensor& index, const at::Tensor& values, const std::vector<int64_t>& starts,
                         const at::Tensor& saved) {
  const ScatterLayout layout = check_scatter(targets, table, ids, index, &values, starts, saved);
  if (layout.n) {
    const c10::cuda::CUDAGuard guard(saved.device());
    check_launch(launch_scatter_apply(layout.type, table.data_ptr<int64_t>(), table.numel(),
                                      ids.data_ptr<int32_t>(), index.data_ptr(), layout.index64,
                                      values.data_ptr<float>(), saved.data_ptr(), layout.n,
                                      max_blocks_for_current_device(), c10::cuda::getCurrentCUDAStream()),
                 "scatter_apply");
  }
  return saved;
}

void scatter_restore(const std::vector<at::Tensor>& targets, const at::Tensor& table, const at::Tensor& ids,
                     const at::Tensor& index, const std::vector<int64_t>& starts, const at::Tensor& saved) {
  const ScatterLayout layout = check_scatter(targets, table, ids, index, nullptr, starts, saved);
  if (layout.n) {
    const c10::cuda::CUDAGuard guard(saved.device());
    check_launch(launch_scatter_restore(layout.type, table.data_ptr<int64_t>(), table.numel(),
                                        ids.data_ptr<int32_t>(), index.data_ptr(), layout.index64, saved.data_ptr(),
                                        layout.n, max_blocks_for_current_device(),
                                        c10::cuda::getCurrentCUDAStream()),
                 "scatter_restore");
  }
}

// grad_y (M, N), x (M, K) of one float dtype, any strides; index int64 1-D contiguous. The kernel
// wants dY^T and X^T with unit stride along M: a transposed view when the input already is
// column-major, else a transposed copy (as the Triton launcher makes).
at::Tensor sddmm(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& index, int64_t in_features) {
  const ElemType type = elem_type(grad_y.scalar_type(), "grad_y");
  TORCH_CHECK_TYPE(x.scalar_type() == grad_y.scalar_type(), "x must have grad_y's dtype ", grad_y.scalar_type(),
                   ", got ", x.scalar_type());
  check_dtype(index, at::kLong, "index");
  TORCH_CHECK_VALUE(grad_y.dim() == 2, "grad_y must be 2-D (tokens, out_features), got shape ", grad_y.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (tokens, in_features), got shape ", x.sizes());
  check_1d(index, "index");
  TORCH_CHECK_VALUE(x.size(0) == grad_y.size(0), "x has ", x.size(0), " tokens, grad_y has ", grad_y.size(0));
  TORCH_CHECK_VALUE(in_features == x.size(1), "in_features is ", in_features, " but x has ", x.size(1), " columns");
  const int64_t m = x.size(0), n_rows = grad_y.size(1), k = in_features;
  TORCH_CHECK_VALUE(k == 0 || n_rows <= std::numeric_limits<int64_t>::max() / k, "out_features * in_features = ",
                    n_rows, " * ", k, " overflows int64");
  check_contiguous(index, "index");
  check_on_device_of(grad_y, grad_y, "grad_y", "grad_y");
  check_on_device_of(x, grad_y, "x", "grad_y");
  check_on_device_of(index, grad_y, "index", "grad_y");

  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t nnz = index.numel();
  at::Tensor out = at::empty({nnz}, grad_y.options().dtype(type == ElemType::kFloat64 ? at::kDouble : at::kFloat));
  if (nnz == 0) return out;
  at::Tensor dyt = grad_y.t(), xt = x.t();
  if (m > 1 && dyt.stride(1) != 1) dyt = dyt.contiguous();
  if (m > 1 && xt.stride(1) != 1) xt = xt.contiguous();
  check_launch(launch_sddmm(type, dyt.data_ptr(), dyt.stride(0), xt.data_ptr(), xt.stride(0),
                            index.data_ptr<int64_t>(), out.data_ptr(), nnz, m, n_rows, k,
                            max_blocks_for_current_device(), c10::cuda::getCurrentCUDAStream()),
               "sddmm");
  return out;
}

// ---------------------------------------------------------------------------------------------
// Test hooks
// ---------------------------------------------------------------------------------------------

std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> philox4x32_host(uint32_t c0, uint32_t c1, uint32_t c2,
                                                                    uint32_t c3, uint32_t k0, uint32_t k1) {
  const PhiloxWords out = philox4x32(PhiloxWords{c0, c1, c2, c3}, k0, k1);
  return {out.c0, out.c1, out.c2, out.c3};
}

at::Tensor philox_uniform_any(uint64_t seed, const at::Tensor& offsets) {
  check_dtype(offsets, at::kLong, "offsets");
  const at::Tensor offs = offsets.contiguous();
  TORCH_CHECK_VALUE(offs.numel() == 0 || offs.min().item<int64_t>() >= 0, "Philox offsets must be non-negative");
  at::Tensor out = at::empty(offs.sizes(), offs.options().dtype(at::kFloat));
  const int64_t n = offs.numel();
  if (offs.is_cuda()) {
    const c10::cuda::CUDAGuard guard(offs.device());
    check_launch(launch_philox_uniform(offs.data_ptr<int64_t>(), out.data_ptr<float>(), n, seed,
                                       max_blocks_for_current_device(), c10::cuda::getCurrentCUDAStream()),
                 "philox_uniform");
    return out;
  }
  TORCH_CHECK_VALUE(offs.is_cpu(), "offsets must be a CPU or CUDA tensor, got ", offs.device());
  const int64_t* src = offs.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) dst[i] = philox_uniform(seed, static_cast<uint64_t>(src[i]));
  return out;
}

std::tuple<at::Tensor, at::Tensor> hard_concrete_cpu(const at::Tensor& log_alpha, uint64_t seed, int64_t offset,
                                                     bool training, double l, double r, double beta) {
  check_dtype(log_alpha, at::kFloat, "log_alpha");
  TORCH_CHECK_VALUE(log_alpha.is_cpu(), "hard_concrete_cpu takes a CPU tensor, got ", log_alpha.device());
  const at::Tensor la = log_alpha.contiguous();
  const GateParams params = gate_params(training, l, r, beta);
  const int64_t n = la.numel();
  check_offset(offset, n);
  at::Tensor z = at::empty_like(la), dz = at::empty_like(la);
  const float* src = la.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  float* dzp = dz.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const Gate gate = hard_concrete(src[i], seed, static_cast<uint64_t>(offset) + static_cast<uint64_t>(i), params);
    zp[i] = gate.z;
    dzp[i] = gate.dz;
  }
  return {z, dz};
}

template <typename S>
void merge_all(const void* old, const float* values, void* out, int64_t n) {
  const auto* src = static_cast<const S*>(old);
  auto* dst = static_cast<S*>(out);
  for (int64_t i = 0; i < n; ++i) dst[i] = Merge<S>::apply(src[i], values[i]);
}

// The scatter kernel's merge (scatter.cuh) over CPU tensors: out[i] = round(acc(old[i]) + acc(values[i])).
at::Tensor scatter_merge_cpu(const at::Tensor& old, const at::Tensor& values) {
  const ElemType type = elem_type(old.scalar_type(), "old");
  check_dtype(values, at::kFloat, "values");
  check_like(values, old, "values", "old");
  TORCH_CHECK_VALUE(old.is_cpu() && values.is_cpu(), "scatter_merge_cpu takes CPU tensors, got ", old.device(),
                    " and ", values.device());
  const at::Tensor src = old.contiguous(), vals = values.contiguous();
  at::Tensor out = at::empty_like(src);
  const int64_t n = src.numel();
  const float* v = vals.data_ptr<float>();
  visit_elem_type(type, [&](auto tag) {
    merge_all<MergeStorage<decltype(tag)>>(src.data_ptr(), v, out.data_ptr(), n);
    return cudaSuccess;
  });
  return out;
}

}  // namespace
}  // namespace dpkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace dpkernels;
  m.doc() = "dpkernels CUDA extension: hard-concrete gate kernels with Triton's Philox stream, sparse diff ops";
  m.def("gate_forward", &gate_forward,
        "Gates z (fp32) or theta0 + z * diff in out_dtype; arguments as dpkernels.reference.gate_forward",
        py::arg("log_alpha"), py::arg("seed"), py::arg("offset"), py::arg("training"), py::arg("l"), py::arg("r"),
        py::arg("beta"), py::arg("theta0") = py::none(), py::arg("diff") = py::none(),
        py::arg("out_dtype") = py::none());
  m.def("gate_backward", &gate_backward,
        "(grad_diff, grad_log_alpha), fresh or accumulated; arguments as dpkernels.reference.gate_backward",
        py::arg("g"), py::arg("diff"), py::arg("log_alpha"), py::arg("seed"), py::arg("offset"), py::arg("training"),
        py::arg("l"), py::arg("r"), py::arg("beta"), py::arg("l0_lambda") = 0.0, py::arg("grad_diff") = py::none(),
        py::arg("grad_log_alpha") = py::none());
  m.def("scatter_apply", &scatter_apply,
        "Merge a sparse diff into same-dtype tensors in one launch, saving the overwritten values; returns "
        "saved. Arguments as dpkernels.reference.scatter_apply",
        py::arg("targets"), py::arg("table"), py::arg("ids"), py::arg("index"), py::arg("values"), py::arg("starts"),
        py::arg("saved"));
  m.def("scatter_restore", &scatter_restore,
        "Write saved back where scatter_apply merged, bit for bit; arguments as dpkernels.reference.scatter_restore",
        py::arg("targets"), py::arg("table"), py::arg("ids"), py::arg("index"), py::arg("starts"), py::arg("saved"));
  m.def("sddmm", &sddmm,
        "(grad_y^T x) at sorted flat indices, fp32 (fp64 for fp64 inputs); arguments as dpkernels.reference.sddmm",
        py::arg("grad_y"), py::arg("x"), py::arg("index"), py::arg("in_features"));
  m.def("philox4x32", &philox4x32_host, "Philox4x32-10 of one counter and key (host code; a test hook)",
        py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"));
  m.def("philox_uniform", &philox_uniform_any,
        "tl.rand(seed, offsets) for int64 offsets on the CPU (host code) or a GPU (kernel); a test hook",
        py::arg("seed"), py::arg("offsets"));
  m.def("hard_concrete_cpu", &hard_concrete_cpu,
        "(z, dz/dlog_alpha) from the kernels' gate math compiled for the host; a test hook", py::arg("log_alpha"),
        py::arg("seed"), py::arg("offset"), py::arg("training"), py::arg("l"), py::arg("r"), py::arg("beta"));
  m.def("scatter_merge_cpu", &scatter_merge_cpu,
        "round(acc(old) + acc(values)) from the scatter kernel's merge compiled for the host; a test hook",
        py::arg("old"), py::arg("values"));
}
