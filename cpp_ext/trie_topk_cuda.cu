// CUDA trie-masked top-k: one thread block per batch row, same semantics as the CPU code.
//
// Each block first validates every referenced node and edge of its row, then runs k rounds of a
// block-wide arg-best: in round r every thread scans its share of the candidates (parents strided over
// warps, edges over lanes) for the best one strictly worse than the candidate taken in round r - 1;
// warp shuffles and one shared-memory pass reduce those to the next output. `better` is a strict
// total order on (score, parent, token), so the rounds enumerate the candidates exactly in order and
// no buffer of size k is needed. Rounds stop early when no candidate is left; the rest is padding.
// A filtered row (a node_mask row) skips the edges whose child's mask byte is 0 while scanning.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "trie_topk.h"

namespace pauserec {
namespace trie_topk {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;

__device__ inline Candidate no_candidate() { return Candidate{-INFINITY, INT32_MAX, INT32_MAX, -1}; }

__device__ inline Candidate pick(const Candidate& a, const Candidate& b) { return better(b, a) ? b : a; }

__device__ inline Candidate shfl_down(const Candidate& c, int delta) {
  Candidate o;
  o.score = __shfl_down_sync(0xffffffffu, c.score, delta);
  o.parent = __shfl_down_sync(0xffffffffu, c.parent, delta);
  o.token = __shfl_down_sync(0xffffffffu, c.token, delta);
  o.edge = __shfl_down_sync(0xffffffffu, c.edge, delta);
  return o;
}

// Checks every referenced node and edge of row b; returns false (and records a status) on bad input.
__device__ bool validate_row_device(const Problem& p, int64_t b, int32_t* status, int* s_bad) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (threadIdx.x == 0 && check_mask_row(p, b) != kOk) {
    atomicCAS(status, 0, kBadMaskRow);
    *s_bad = 1;
  }
  for (int64_t j = warp; j < p.k_in; j += kWarps) {
    int64_t lo, hi;
    int32_t st = node_edges(p.trie, p.nodes[b * p.k_in + j], &lo, &hi);
    for (int64_t e = lo + lane; st == kOk && e < hi; e += kWarpSize) st = check_edge(p.trie, e, lo, p.vocab);
    if (st != kOk) {
      atomicCAS(status, 0, st);
      *s_bad = 1;
    }
  }
  __syncthreads();
  return *s_bad == 0;
}

// Best candidate of this thread's share that comes strictly after `last` (all of them when !has_last).
__device__ Candidate scan_share(const Problem& p, int64_t b, bool has_last, const Candidate& last) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  Candidate best = no_candidate();
  const uint8_t* mask = row_mask(p, b);  // nullptr = unfiltered
  for (int64_t j = warp; j < p.k_in; j += kWarps) {
    const int32_t node = p.nodes[b * p.k_in + j];
    const float ps = p.scores[b * p.k_in + j];
    if (node < 0 || !live_score(ps)) continue;
    const int64_t lo = p.trie.offsets[node], hi = p.trie.offsets[node + 1];
    const float* lp = p.logprobs + (b * p.k_in + j) * p.vocab;  // (V,)
    for (int64_t e = lo + lane; e < hi; e += kWarpSize) {
      const int32_t tok = p.trie.tokens[e];
      const float s = candidate_score(ps, lp[tok]);
      if (!live_score(s) || !enterable(mask, p.trie.children[e])) continue;
      const Candidate c{s, static_cast<int32_t>(j), tok, static_cast<int32_t>(e)};
      if ((!has_last || better(last, c)) && better(c, best)) best = c;
    }
  }
  return best;
}

__global__ void __launch_bounds__(kThreads) trie_topk_kernel(Problem p, int32_t* status) {
  __shared__ Candidate s_warp_best[kWarps];
  __shared__ Candidate s_taken;
  __shared__ int s_bad;
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  if (!validate_row_device(p, b, status, &s_bad)) return;

  Candidate last = no_candidate();
  int64_t taken = 0;
  for (; taken < p.k; ++taken) {
    Candidate best = scan_share(p, b, taken > 0, last);
    for (int delta = kWarpSize / 2; delta > 0; delta /= 2) best = pick(best, shfl_down(best, delta));
    if (lane == 0) s_warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      Candidate w = s_warp_best[0];
      for (int i = 1; i < kWarps; ++i) w = pick(w, s_warp_best[i]);
      s_taken = w;
    }
    __syncthreads();
    last = s_taken;
    if (!live_score(last.score)) break;  // uniform: every thread read the same s_taken
    if (threadIdx.x == 0) {
      const int64_t o = b * p.k + taken;
      p.out_parent[o] = last.parent;
      p.out_token[o] = last.token;
      p.out_node[o] = p.trie.children[last.edge];
      p.out_score[o] = last.score;
    }
  }
  for (int64_t i = taken + threadIdx.x; i < p.k; i += kThreads) {
    const int64_t o = b * p.k + i;
    p.out_parent[o] = -1;
    p.out_token[o] = -1;
    p.out_node[o] = -1;
    p.out_score[o] = -INFINITY;
  }
}

std::string describe(const char* what, cudaError_t e) {
  return std::string(what) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

cuda::Result failure(const char* what, cudaError_t e) {
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  return cuda::Result{cuda::kRuntimeFailure, describe(what, e)};
}

std::string status_message(int32_t st) {
  switch (st) {
    case kBadNode: return "a node id is outside [-1, N): pass trie node ids of this trie (-1 for a dead beam)";
    case kBadOffsets: return "a referenced node's offsets give an edge range outside [0, E]";
    case kBadToken: return "a trie token of a referenced node is outside [0, V): logprobs must cover the codebook";
    case kUnsorted: return "a referenced node's trie tokens are not strictly increasing";
    case kBadChild: return "a trie child of a referenced node is outside [0, N)";
    case kBadMaskRow: return "a mask_row value is outside [-1, M): pass a row of node_mask (-1 = unfiltered)";
    default: return "invalid trie-masked top-k input";
  }
}

// Launches on `stream` and waits; p holds device pointers.
cuda::Result launch_and_wait(const Problem& p, cudaStream_t stream, int32_t* d_status) {
  cudaError_t e = cudaMemsetAsync(d_status, 0, sizeof(int32_t), stream);
  if (e != cudaSuccess) return failure("cudaMemsetAsync", e);
  trie_topk_kernel<<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p, d_status);
  e = cudaGetLastError();
  if (e != cudaSuccess) return failure("trie_topk_kernel launch", e);
  int32_t h_status = 0;
  e = cudaMemcpyAsync(&h_status, d_status, sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
  if (e != cudaSuccess) return failure("cudaMemcpyAsync (status)", e);
  e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return failure("trie_topk_kernel", e);
  if (h_status != kOk) return cuda::Result{cuda::kInvalidInput, status_message(h_status)};
  return cuda::Result{};
}

// One device allocation carved into aligned slices; freed on scope exit. Stream-ordered where the
// device supports memory pools, plain cudaMalloc otherwise.
struct DeviceArena {
  char* base = nullptr;
  cudaStream_t stream = nullptr;
  bool pooled = true;
  cudaError_t allocate(size_t bytes, cudaStream_t s) {
    stream = s;
    cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&base), bytes, s);
    if (e == cudaErrorNotSupported) {
      cudaGetLastError();
      pooled = false;
      e = cudaMalloc(reinterpret_cast<void**>(&base), bytes);
    }
    return e;
  }
  ~DeviceArena() {
    if (!base) return;
    if (pooled) {
      cudaFreeAsync(base, stream);
    } else {
      cudaFree(base);
    }
  }
};

size_t aligned(size_t n) { return (n + 255) / 256 * 256; }

cuda::Result grid_check(const Problem& p) {
  if (p.batch > INT_MAX)
    return cuda::Result{cuda::kInvalidInput, "batch size " + std::to_string(p.batch) + " exceeds the CUDA grid limit"};
  return cuda::Result{};
}

}  // namespace

namespace cuda {

bool device_usable(std::string* why) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (why) {
      *why = "no usable CUDA device (" + std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e) + ")";
      if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice)
        *why += "; this module needs an NVIDIA GPU with a driver for CUDA " + std::to_string(CUDART_VERSION / 1000) +
                "." + std::to_string(CUDART_VERSION % 1000 / 10) + " or newer";
    }
    return false;
  }
  if (count == 0) {
    if (why) *why = "no CUDA device found";
    return false;
  }
  return true;
}

Result run_device(const Problem& p, uintptr_t stream_handle) {
  std::string why;
  if (!device_usable(&why)) return Result{kRuntimeFailure, why};
  Result r = grid_check(p);
  if (r.kind != kDone || p.batch == 0) return r;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  DeviceArena arena;
  const cudaError_t e = arena.allocate(sizeof(int32_t), stream);
  if (e != cudaSuccess) return failure("device allocation", e);
  return launch_and_wait(p, stream, reinterpret_cast<int32_t*>(arena.base));
}

Result run_host(const Problem& hp) {
  std::string why;
  if (!device_usable(&why)) return Result{kRuntimeFailure, why};
  const ErrorInfo err = validate_all(hp);
  if (err.status != kOk) return Result{kInvalidInput, error_message(err, hp)};
  Result r = grid_check(hp);
  if (r.kind != kDone || hp.batch == 0) return r;

  const bool masked = hp.mask_row != nullptr && hp.node_mask != nullptr;
  const size_t bk = static_cast<size_t>(hp.batch * hp.k_in), out = static_cast<size_t>(hp.batch * hp.k);
  const size_t n_off = static_cast<size_t>(hp.trie.num_nodes + 1), n_edge = static_cast<size_t>(hp.trie.num_edges);
  const size_t n_mask = masked ? static_cast<size_t>(hp.mask_rows * hp.trie.num_nodes) : 0;
  const size_t n_rows = masked ? static_cast<size_t>(hp.batch) : 0;
  constexpr int kSlots = 13;  // 6 inputs, 2 filter inputs, 4 outputs, status
  const size_t sizes[kSlots] = {bk * 4, bk * static_cast<size_t>(hp.vocab) * 4, bk * 4, n_off * 4, n_edge * 4,
                                n_edge * 4, n_mask, n_rows * 4, out * 4, out * 4, out * 4, out * 4, 4};
  size_t total = 0;
  for (size_t s : sizes) total += aligned(s);

  cudaStream_t stream = nullptr;  // legacy default stream
  DeviceArena arena;
  cudaError_t e = arena.allocate(total, stream);
  if (e != cudaSuccess) return failure("device allocation", e);
  void* slot[kSlots];
  size_t at = 0;
  for (int i = 0; i < kSlots; ++i) {
    slot[i] = arena.base + at;
    at += aligned(sizes[i]);
  }
  const void* src[8] = {hp.scores,         hp.logprobs,       hp.nodes,     hp.trie.offsets,
                        hp.trie.tokens,    hp.trie.children,  hp.node_mask, hp.mask_row};
  for (int i = 0; i < 8; ++i) {
    if (sizes[i] == 0) continue;
    e = cudaMemcpyAsync(slot[i], src[i], sizes[i], cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return failure("cudaMemcpyAsync (inputs)", e);
  }
  Problem dp = hp;
  dp.scores = static_cast<const float*>(slot[0]);
  dp.logprobs = static_cast<const float*>(slot[1]);
  dp.nodes = static_cast<const int32_t*>(slot[2]);
  dp.trie.offsets = static_cast<const int32_t*>(slot[3]);
  dp.trie.tokens = static_cast<const int32_t*>(slot[4]);
  dp.trie.children = static_cast<const int32_t*>(slot[5]);
  dp.node_mask = masked ? static_cast<const uint8_t*>(slot[6]) : nullptr;
  dp.mask_row = masked ? static_cast<const int32_t*>(slot[7]) : nullptr;
  dp.out_parent = static_cast<int32_t*>(slot[8]);
  dp.out_token = static_cast<int32_t*>(slot[9]);
  dp.out_node = static_cast<int32_t*>(slot[10]);
  dp.out_score = static_cast<float*>(slot[11]);
  r = launch_and_wait(dp, stream, static_cast<int32_t*>(slot[12]));
  if (r.kind != kDone) return r;
  void* dst[4] = {hp.out_parent, hp.out_token, hp.out_node, hp.out_score};
  for (int i = 0; i < 4; ++i) {
    e = cudaMemcpyAsync(dst[i], slot[8 + i], sizes[8 + i], cudaMemcpyDeviceToHost, stream);
    if (e != cudaSuccess) return failure("cudaMemcpyAsync (outputs)", e);
  }
  e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return failure("cudaStreamSynchronize", e);
  return Result{};
}

}  // namespace cuda
}  // namespace trie_topk
}  // namespace pauserec
