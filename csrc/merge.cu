// Fused in-place merge of a partial attention result into accumulators.
//
// Legend: out_THD [T, H, D] (T rows of the THD layout, any row/head strides, unit stride along D);
// lse_HT [H, T] fp32 natural-log normaliser (any strides). One warp merges one (row, head) pair:
//
//   lse = log(exp(lse_acc) + exp(lse_b)),  out_acc = w_a * out_acc + w_b * out_b
//
// The arithmetic is fp32. out_acc is fp32, or the partial's own 16-bit type for a row's last merge:
// then the result is rounded once, exactly as an fp32 accumulator converted afterwards would be.
//
// A pair that has seen no key on either side (both lse = -inf) gets out = 0, lse = -inf. An accumulator
// row with lse = -inf is not read (its weight is 0): the ring starts every row at out = 0, lse = -inf.
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <cmath>
#include <type_traits>

namespace {

template <typename acc_t, typename scalar_t>
__global__ void merge_kernel(acc_t* __restrict__ out_acc, float* __restrict__ lse_acc,
                             const scalar_t* __restrict__ out_b, const float* __restrict__ lse_b, int64_t rows,
                             int64_t heads, int64_t dim, int64_t acc_st, int64_t acc_sh, int64_t lacc_sh,
                             int64_t lacc_st, int64_t b_st, int64_t b_sh, int64_t lb_sh, int64_t lb_st) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * heads) return;
  const int64_t t = warp / heads;
  const int64_t h = warp % heads;
  float* lse_a_ptr = lse_acc + h * lacc_sh + t * lacc_st;
  const float la = *lse_a_ptr;
  const float lb = lse_b[h * lb_sh + t * lb_st];
  float hi = fmaxf(la, lb);
  if (hi == -INFINITY) hi = 0.f;  // neither side has seen a key: weights exp(-inf) = 0, not NaN
  const float wa = expf(la - hi);
  const float wb = expf(lb - hi);
  const float total = wa + wb;
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const float sa = wa * inv;
  const float sb = wb * inv;
  acc_t* acc = out_acc + t * acc_st + h * acc_sh;
  const scalar_t* src = out_b + t * b_st + h * b_sh;
  if (la == -INFINITY) {
    // The accumulator has seen no key (the first merge of every row): its weight is exactly 0, so skip
    // reading it. This branch is uniform across the warp (one row, one head).
    for (int64_t d = lane; d < dim; d += 32) acc[d] = static_cast<acc_t>(sb * static_cast<float>(src[d]));
  } else {
    for (int64_t d = lane; d < dim; d += 32) {
      acc[d] = static_cast<acc_t>(sa * static_cast<float>(acc[d]) + sb * static_cast<float>(src[d]));
    }
  }
  if (lane == 0) *lse_a_ptr = hi + logf(total);
}

}  // namespace

// Launches the merge; the caller (bindings.cpp) has checked every input. Returns the launch status:
// exceptions are raised on the C++ side only, never from this (nvcc-compiled) translation unit.
cudaError_t merge_launch(torch::Tensor& out_acc, torch::Tensor& lse_acc, const torch::Tensor& out,
                         const torch::Tensor& lse, cudaStream_t stream) {
  const int64_t rows = out.size(0), heads = out.size(1), dim = out.size(2);
  const int threads = 256;
  const int64_t blocks = (rows * heads * 32 + threads - 1) / threads;
  auto launch = [&](auto* acc, auto* src) {
    using acc_t = std::remove_pointer_t<decltype(acc)>;
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    merge_kernel<acc_t, scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        acc, lse_acc.data_ptr<float>(), src, lse.data_ptr<float>(), rows, heads, dim, out_acc.stride(0),
        out_acc.stride(1), lse_acc.stride(0), lse_acc.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        lse.stride(1));
  };
  // bindings.cpp checked the dtypes: out_acc is fp32, or the 16-bit type of out
  const bool fp32_acc = out_acc.scalar_type() == at::kFloat;
  switch (out.scalar_type()) {
    case at::kFloat: launch(out_acc.data_ptr<float>(), out.data_ptr<float>()); break;
    case at::kHalf:
      if (fp32_acc) launch(out_acc.data_ptr<float>(), out.data_ptr<at::Half>());
      else launch(out_acc.data_ptr<at::Half>(), out.data_ptr<at::Half>());
      break;
    case at::kBFloat16:
      if (fp32_acc) launch(out_acc.data_ptr<float>(), out.data_ptr<at::BFloat16>());
      else launch(out_acc.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
      break;
    default: return cudaErrorInvalidValue;  // unreachable
  }
  return cudaGetLastError();
}
