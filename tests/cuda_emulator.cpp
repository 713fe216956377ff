// Host emulation of the CUDA kernels in cpp_ext/trie_topk_kernels.cuh (tests only; no GPU needed).
//
// The kernel source is compiled as plain C++: every CUDA thread of a block is a std::thread,
// __syncthreads is a std::barrier, __shared__ variables are function statics (blocks run one after
// another), atomics are std::atomic_ref. This checks the algorithm exactly as written for the GPU
// (block strides, radix passes, bitonic sorts, shared counters) against the NumPy reference; it does
// not check what only hardware shows (warp scheduling, memory coherence across blocks, speed).
// Built by tests/test_cuda_emulation.py with -DPAUSEREC_TOPK_THREADS / _SHARED_KEYS small enough to
// reach every path (radix select, keys in global memory) on small inputs.
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace emu {
struct Dim {
  unsigned x;
};
inline thread_local unsigned tid = 0;
inline unsigned bid = 0, bdim = 1, gdim = 1;
inline std::barrier<>* bar = nullptr;
}  // namespace emu

#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (::emu::Dim{::emu::tid})
#define blockIdx (::emu::Dim{::emu::bid})
#define blockDim (::emu::Dim{::emu::bdim})
#define gridDim (::emu::Dim{::emu::gdim})

inline void __syncthreads() { emu::bar->arrive_and_wait(); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline int atomicCAS(int* p, int expected, int desired) {
  std::atomic_ref<int>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

#include "../cpp_ext/trie_topk_kernels.cuh"

namespace tk = pauserec::trie_topk;
namespace kn = pauserec::trie_topk::kernels;

namespace {

// Runs `body` as one block of `threads` threads for every block index in [0, blocks).
template <class F>
void launch(int64_t blocks, int threads, F body) {
  for (int64_t b = 0; b < blocks; ++b) {
    std::barrier<> bar(threads);
    emu::bar = &bar;
    emu::bid = static_cast<unsigned>(b);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([t, &body] {
        emu::tid = static_cast<unsigned>(t);
        body();
      });
    }
    for (auto& th : pool) th.join();
  }
  emu::bar = nullptr;
}

int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace

extern "C" {

int emu_threads() { return kn::kThreads; }
int emu_shared_keys() { return kn::kSharedKeys; }

// Same arguments as the device entry point, host memory; returns the device status (0 = ok).
int emu_trie_topk(const float* scores, const float* logprobs, const int32_t* nodes, const int32_t* offsets,
                  const int32_t* tokens, const int32_t* children, int64_t num_nodes, int64_t num_edges, int64_t batch,
                  int64_t k_in, int64_t vocab, int64_t k, const uint8_t* node_mask, const int32_t* mask_row,
                  int64_t mask_rows, int32_t* out_parent, int32_t* out_token, int32_t* out_node, float* out_score) {
  tk::Problem p{};
  p.scores = scores;
  p.logprobs = logprobs;
  p.nodes = nodes;
  p.trie = tk::TrieView{offsets, tokens, children, num_nodes, num_edges};
  p.batch = batch;
  p.k_in = k_in;
  p.vocab = vocab;
  p.k = k;
  if (mask_row) {
    p.node_mask = node_mask;
    p.mask_row = mask_row;
    p.mask_rows = mask_rows;
  }
  p.out_parent = out_parent;
  p.out_token = out_token;
  p.out_node = out_node;
  p.out_score = out_score;
  std::vector<uint32_t> base(static_cast<size_t>(batch * k_in) + 1);
  const int64_t stride = k > kn::kSharedKeys ? pow2_at_least(k) : 0;
  std::vector<uint64_t> keys(static_cast<size_t>(batch * stride) + 1);
  int32_t status = 0;
  kn::Workspace ws{base.data(), keys.data(), stride, &status};
  launch(batch, kn::kThreads, [&] { kn::trie_topk_kernel(p, ws); });
  return status;
}

void emu_copy_slots(void* dst, const void* src, int64_t rows, int64_t dst_slots, int64_t dst_at, int64_t src_slots,
                    int64_t src_at, int64_t n, int64_t width) {
  launch(1, 1, [&] {
    kn::copy_slots_kernel(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), rows, dst_slots, dst_at,
                          src_slots, src_at, n, width);
  });
}

void emu_gather_beams(void* dst, const void* src, const int32_t* parent, int64_t outer, int64_t batch, int64_t heads,
                      int64_t beams, int64_t inner) {
  launch(1, 1, [&] {
    kn::gather_beams_kernel(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), parent, outer, batch, heads,
                            beams, inner);
  });
}

void emu_tokens_to_codes(int64_t* dst, const int32_t* src, int64_t n) {
  launch(1, 1, [&] { kn::tokens_to_codes_kernel(dst, src, n); });
}

}  // extern "C"
