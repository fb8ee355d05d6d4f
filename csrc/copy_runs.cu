// Gather/scatter of row runs in the THD layout, behind shard/unshard: one launch for any number of runs.
//
// Run i copies rows [src_starts[i], src_starts[i] + lengths[i]) of src to rows starting at dst_starts[i] of dst.
// Rows are contiguous blocks of row_bytes bytes (both tensors contiguous, same dtype and trailing shape).
// Grid: y = run, x = chunks of the longest run; blocks past a shorter run's end return at once.
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>

namespace {

template <typename word_t>
__global__ void copy_runs_kernel(word_t* __restrict__ dst, const word_t* __restrict__ src,
                                 const int64_t* __restrict__ src_starts, const int64_t* __restrict__ lengths,
                                 const int64_t* __restrict__ dst_starts, int64_t row_words) {
  const int64_t run = blockIdx.y;
  const int64_t n = lengths[run] * row_words;
  const word_t* from = src + src_starts[run] * row_words;
  word_t* to = dst + dst_starts[run] * row_words;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    to[i] = from[i];
  }
}

}  // namespace

// Launches the copy; the caller (bindings.cpp) has checked every input. Returns the launch status.
cudaError_t copy_runs_launch(torch::Tensor& dst, const torch::Tensor& src, const torch::Tensor& src_starts,
                             const torch::Tensor& lengths, const torch::Tensor& dst_starts, cudaStream_t stream) {
  const int64_t runs = lengths.size(0);
  const int64_t row_bytes = dst.numel() / dst.size(0) * dst.element_size();
  const int threads = 256;
  // Enough blocks per run to fill the GPU on one long run; the loop strides over the rest.
  const unsigned chunks = static_cast<unsigned>(std::max<int64_t>(1, 1024 / runs));
  const dim3 grid(chunks, static_cast<unsigned>(runs));
  auto aligned = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(dst.data_ptr()) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(src.data_ptr()) % bytes == 0;
  };
  const int64_t* s0 = src_starts.data_ptr<int64_t>();
  const int64_t* n = lengths.data_ptr<int64_t>();
  const int64_t* d0 = dst_starts.data_ptr<int64_t>();
  if (aligned(16)) {
    copy_runs_kernel<int4><<<grid, threads, 0, stream>>>(static_cast<int4*>(dst.data_ptr()),
                                                        static_cast<const int4*>(src.data_ptr()), s0, n, d0,
                                                        row_bytes / 16);
  } else if (aligned(4)) {
    copy_runs_kernel<int32_t><<<grid, threads, 0, stream>>>(static_cast<int32_t*>(dst.data_ptr()),
                                                           static_cast<const int32_t*>(src.data_ptr()), s0, n, d0,
                                                           row_bytes / 4);
  } else {
    copy_runs_kernel<uint8_t><<<grid, threads, 0, stream>>>(static_cast<uint8_t*>(dst.data_ptr()),
                                                           static_cast<const uint8_t*>(src.data_ptr()), s0, n, d0,
                                                           row_bytes);
  }
  return cudaGetLastError();
}
