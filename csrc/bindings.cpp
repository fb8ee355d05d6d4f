// Python bindings of ringpack._C.
//
// ringpack/_ext.py checks every input first and raises a ValueError that names the broken constraint
// (merge_cuda, copy_runs). The ops here repeat those checks defensively and return "" or a fixed
// message: they never throw and never format torch types, because on the GPU image (torch 2.11,
// CUDA 13) a TORCH_CHECK throw, and then a message formatting a ScalarType, crashed the interpreter
// from this extension. The .cu files only launch kernels and return the CUDA status.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>

cudaError_t merge_launch(torch::Tensor& out_acc, torch::Tensor& lse_acc, const torch::Tensor& out,
                         const torch::Tensor& lse, cudaStream_t stream);
cudaError_t copy_runs_launch(torch::Tensor& dst, const torch::Tensor& src, const torch::Tensor& src_starts,
                             const torch::Tensor& lengths, const torch::Tensor& dst_starts, cudaStream_t stream);

namespace {

// Return a fixed message (from the first failing check) instead of throwing.
#define RINGPACK_CHECK(cond, message) \
  if (!(cond)) return std::string(message)

bool is_16_or_32_bit_float(const torch::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

std::string merge_(torch::Tensor out_acc, torch::Tensor lse_acc, torch::Tensor out, torch::Tensor lse) {
  RINGPACK_CHECK(out_acc.is_cuda() && lse_acc.is_cuda() && out.is_cuda() && lse.is_cuda(),
                 "ringpack merge_: all four tensors must be CUDA tensors");
  RINGPACK_CHECK(out_acc.device() == out.device() && lse_acc.device() == out.device() && lse.device() == out.device(),
                 "ringpack merge_: all four tensors must be on one device");
  RINGPACK_CHECK(out_acc.dim() == 3 && out.dim() == 3 && out_acc.sizes() == out.sizes(),
                 "ringpack merge_: out_acc and out must be 3-D [T, H, D] of the same shape");
  const int64_t rows = out.size(0), heads = out.size(1), dim = out.size(2);
  RINGPACK_CHECK(lse_acc.dim() == 2 && lse.dim() == 2 && lse_acc.size(0) == heads && lse_acc.size(1) == rows &&
                     lse.sizes() == lse_acc.sizes(),
                 "ringpack merge_: lse_acc and lse must be [H, T] for out [T, H, D]");
  RINGPACK_CHECK(lse_acc.scalar_type() == at::kFloat, "ringpack merge_: lse_acc must be float32");
  RINGPACK_CHECK(lse.scalar_type() == at::kFloat, "ringpack merge_: lse must be float32");
  RINGPACK_CHECK(is_16_or_32_bit_float(out), "ringpack merge_: out must be float32, float16 or bfloat16");
  RINGPACK_CHECK(out_acc.scalar_type() == at::kFloat || out_acc.scalar_type() == out.scalar_type(),
                 "ringpack merge_: out_acc must be float32 or out's dtype");
  RINGPACK_CHECK(dim == 0 || (out_acc.stride(2) == 1 && out.stride(2) == 1),
                 "ringpack merge_: out_acc and out must have unit stride along the head dim (last)");
  RINGPACK_CHECK(rows * heads * 32 / 256 < 0x7fffffffLL, "ringpack merge_: too many rows x heads for one launch");
  if (rows == 0 || heads == 0) return "";
  const at::cuda::CUDAGuard guard(out.device());
  const cudaError_t err = merge_launch(out_acc, lse_acc, out, lse, at::cuda::getCurrentCUDAStream());
  RINGPACK_CHECK(err == cudaSuccess, "ringpack merge_: kernel launch failed");
  return "";
}

std::string copy_runs_(torch::Tensor dst, torch::Tensor src, torch::Tensor src_starts, torch::Tensor lengths,
                       torch::Tensor dst_starts) {
  RINGPACK_CHECK(dst.is_cuda() && src.is_cuda() && dst.device() == src.device(),
                 "ringpack copy_runs_: dst and src must be CUDA tensors on one device");
  RINGPACK_CHECK(dst.scalar_type() == src.scalar_type(), "ringpack copy_runs_: dst and src must share a dtype");
  RINGPACK_CHECK(dst.dim() >= 1 && src.dim() == dst.dim() && dst.sizes().slice(1) == src.sizes().slice(1),
                 "ringpack copy_runs_: dst and src must have the same shape after dim 0");
  RINGPACK_CHECK(dst.is_contiguous() && src.is_contiguous(), "ringpack copy_runs_: dst and src must be contiguous");
  for (const auto& t : {src_starts, lengths, dst_starts}) {
    RINGPACK_CHECK(t.device() == dst.device() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
                   "ringpack copy_runs_: run tables must be contiguous 1-D int64 on dst's device");
  }
  const int64_t runs = lengths.size(0);
  RINGPACK_CHECK(src_starts.size(0) == runs && dst_starts.size(0) == runs,
                 "ringpack copy_runs_: src_starts, lengths and dst_starts must have the same length");
  RINGPACK_CHECK(runs <= 65535, "ringpack copy_runs_: at most 65535 runs per launch");
  if (runs == 0 || dst.numel() == 0) return "";
  const at::cuda::CUDAGuard guard(dst.device());
  const cudaError_t err = copy_runs_launch(dst, src, src_starts, lengths, dst_starts, at::cuda::getCurrentCUDAStream());
  RINGPACK_CHECK(err == cudaSuccess, "ringpack copy_runs_: kernel launch failed");
  return "";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("merge_", &merge_,
        "merge_(out_acc[T,H,D] f32 or out's dtype, lse_acc[H,T] f32, out[T,H,D], lse[H,T] f32): fused exact "
        "in-place merge; "
        "returns \"\" or the broken constraint (call ringpack._ext.merge_cuda, which checks first)",
        py::arg("out_acc"), py::arg("lse_acc"), py::arg("out"), py::arg("lse"));
  m.def("copy_runs_", &copy_runs_,
        "copy_runs_(dst, src, src_starts, lengths, dst_starts): dst[dst_starts[i] + j] = src[src_starts[i] + j]; "
        "returns \"\" or the broken constraint (call ringpack._ext.copy_runs, which checks first)",
        py::arg("dst"), py::arg("src"), py::arg("src_starts"), py::arg("lengths"), py::arg("dst_starts"));
}
