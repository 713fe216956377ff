// Device code of the CUDA trie-masked top-k and the beam-state kernels (included by
// trie_topk_cuda.cu). It uses only threadIdx/blockIdx/blockDim/gridDim, __syncthreads, atomicAdd,
// atomicCAS and __float_as_uint, so tests/cuda_emulator.cpp can compile this same file for the host
// (one block at a time, a thread per CUDA thread) and fuzz it against the NumPy reference on a CPU.
//
// Top-k: one thread block per batch row, same semantics as the CPU code.
//
// Every candidate (parent j, edge e) of a row gets one unique 64-bit key whose ascending order is
// the output order: the high 32 bits order the score (higher first, -0.0 == 0.0), the low 32 bits
// are the candidate's ordinal in (parent, edge) scan order, i.e. its (parent, token) order since a
// node's tokens increase with its edges. The ordinal of (j, e) is base[j] + (e - first edge of j),
// base being the exclusive prefix sum of the row's edge counts (a block scan, kept in the workspace).
//
// Selection of the best k keys per row, the work independent of k until the final sort:
//   * a row with at most kSharedKeys live candidates: all keys into shared memory, one bitonic sort;
//   * otherwise a radix select, 8 bits a pass from the top: each pass re-enumerates the candidates,
//     histograms the next digit of the keys that share the prefix chosen so far, and keeps the bin
//     holding the k-th key; once that bin fits in shared memory its keys are sorted there, which
//     gives the k-th key exactly. The keys <= that one are gathered (shared memory for
//     k <= kSharedKeys, else the workspace) and sorted.
// Outputs are decoded from the sorted keys: the ordinal gives the parent (binary search of base)
// and the edge; token, child and score are read and recomputed from the inputs.
// Validation runs on the device first, per row, exactly as validate_row on the host.
#pragma once

#include <cstdint>

#include "trie_topk.h"

#ifndef PAUSEREC_TOPK_THREADS
#define PAUSEREC_TOPK_THREADS 256  // threads per block (a multiple of 32)
#endif
#ifndef PAUSEREC_TOPK_SHARED_KEYS
#define PAUSEREC_TOPK_SHARED_KEYS 4096  // 32 KiB of keys in shared memory (a power of two)
#endif

namespace pauserec {
namespace trie_topk {
namespace kernels {


constexpr int kWarpSize = 32;
constexpr int kThreads = PAUSEREC_TOPK_THREADS;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kSharedKeys = PAUSEREC_TOPK_SHARED_KEYS;  // keys a block sorts in shared memory
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr uint64_t kNoKey = ~uint64_t(0);  // never a candidate's key (its score half would be NaN)

// ---- keys ----

// uint32 whose ascending order is descending score order; s is never NaN. -0.0 and 0.0 map alike.
__device__ inline uint32_t descending_key(float s) {
  const uint32_t bits = __float_as_uint(s == 0.0f ? 0.0f : s);
  const uint32_t ascending = (bits >> 31) ? ~bits : (bits | 0x80000000u);
  return ~ascending;
}

__device__ inline uint64_t make_key(float s, uint32_t ordinal) {
  return (static_cast<uint64_t>(descending_key(s)) << 32) | ordinal;
}

// Calls f(key) for every live, enterable candidate of row b (parents strided over warps, edges over
// lanes). Deterministic: every pass computes the same keys.
template <class F>
__device__ void for_each_candidate(const Problem& p, int64_t b, const uint32_t* base, F f) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const uint8_t* mask = row_mask(p, b);  // nullptr = unfiltered
  for (int64_t j = warp; j < p.k_in; j += kWarps) {
    const int32_t node = p.nodes[b * p.k_in + j];
    const float ps = p.scores[b * p.k_in + j];
    if (node < 0 || !live_score(ps)) continue;
    const int64_t lo = p.trie.offsets[node], hi = p.trie.offsets[node + 1];
    const float* lp = p.logprobs + (b * p.k_in + j) * p.vocab;  // (V,)
    const uint32_t bj = base[j];
    for (int64_t e = lo + lane; e < hi; e += kWarpSize) {
      const float s = candidate_score(ps, lp[p.trie.tokens[e]]);
      if (!live_score(s) || !enterable(mask, p.trie.children[e])) continue;
      f(make_key(s, bj + static_cast<uint32_t>(e - lo)));
    }
  }
}

// ---- block-wide building blocks ----

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

// base[j] = number of edges of the row's parents before j (every referenced node counts, live or
// not). Returns the row's total; the caller rejects totals of 2**32 and more. One thread scans each
// chunk of kThreads counts (rows have few beams; this runs once per row).
template <class S>
__device__ uint64_t row_bases(const Problem& p, int64_t b, uint32_t* base, S& sh) {
  if (threadIdx.x == 0) sh.carry = 0;
  __syncthreads();
  for (int64_t c0 = 0; c0 < p.k_in; c0 += kThreads) {
    const int64_t j = c0 + threadIdx.x;
    uint64_t count = 0;
    if (j < p.k_in) {
      const int32_t node = p.nodes[b * p.k_in + j];
      if (node >= 0) count = static_cast<uint64_t>(p.trie.offsets[node + 1] - p.trie.offsets[node]);
    }
    sh.scan[threadIdx.x] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t run = sh.carry;
      for (int i = 0; i < kThreads; ++i) {
        const uint64_t c = sh.scan[i];
        sh.scan[i] = run;
        run += c;
      }
      sh.carry = run;
    }
    __syncthreads();
    if (j < p.k_in) base[j] = static_cast<uint32_t>(sh.scan[threadIdx.x]);  // only used when the total fits
    __syncthreads();
  }
  return sh.carry;
}

// Ascending bitonic sort of a[0, n) (n a power of two) by the whole block; a in shared or global memory.
__device__ void bitonic_sort(uint64_t* a, int64_t n) {
  for (int64_t size = 2; size <= n; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t i = threadIdx.x; i < n / 2; i += kThreads) {
        const int64_t lo = 2 * stride * (i / stride) + (i % stride), hi = lo + stride;
        const bool ascending = (lo & size) == 0;
        const uint64_t x = a[lo], y = a[hi];
        if ((x > y) == ascending) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

__device__ inline int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Pads a[n, pow2(n)) with kNoKey and sorts a[0, pow2(n)).
__device__ void sort_keys(uint64_t* a, int64_t n) {
  const int64_t padded = pow2_at_least(n);
  for (int64_t i = n + threadIdx.x; i < padded; i += kThreads) a[i] = kNoKey;
  __syncthreads();
  bitonic_sort(a, padded);
}

// Largest j with base[j] <= ordinal (the parent holding that ordinal, see the file comment).
__device__ inline int64_t parent_of(const uint32_t* base, int64_t k_in, uint32_t ordinal) {
  int64_t lo = 0, hi = k_in;  // first index with base > ordinal lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (base[mid] <= ordinal) lo = mid + 1; else hi = mid;
  }
  return lo - 1;
}

// Writes the row's outputs from its sorted keys[0, n) and pads slots n..k.
__device__ void write_row(const Problem& p, int64_t b, const uint32_t* base, const uint64_t* keys, int64_t n) {
  for (int64_t i = threadIdx.x; i < p.k; i += kThreads) {
    const int64_t o = b * p.k + i;
    if (i >= n) {
      p.out_parent[o] = -1;
      p.out_token[o] = -1;
      p.out_node[o] = -1;
      p.out_score[o] = -INFINITY;
      continue;
    }
    const uint32_t ordinal = static_cast<uint32_t>(keys[i]);
    const int64_t j = parent_of(base, p.k_in, ordinal);
    const int32_t node = p.nodes[b * p.k_in + j];
    const int64_t e = p.trie.offsets[node] + (ordinal - base[j]);
    const int32_t tok = p.trie.tokens[e];
    p.out_parent[o] = static_cast<int32_t>(j);
    p.out_token[o] = tok;
    p.out_node[o] = p.trie.children[e];
    p.out_score[o] = candidate_score(p.scores[b * p.k_in + j], p.logprobs[(b * p.k_in + j) * p.vocab + tok]);
  }
}

struct Workspace {
  uint32_t* base;      // (B, K_in) ordinal bases
  uint64_t* keys;      // (B, keys_stride) gathered keys, only when k > kSharedKeys
  int64_t keys_stride;  // pow2(k) or 0
  int32_t* status;
};

struct Shared {
  uint64_t keys[kSharedKeys];
  uint64_t scan[kThreads];
  uint32_t hist[kBins];
  uint64_t carry;
  uint64_t prefix, cut;
  uint32_t need, bucket, count;
  int bad;
};

// Histogram of digit (key >> shift) & 0xff over the keys whose bits above shift + 8 equal prefix
// (all keys when shift = 56). Leaves the counts in sh.hist.
__device__ void histogram(const Problem& p, int64_t b, const uint32_t* base, Shared& sh, int shift, uint64_t prefix) {
  for (int i = threadIdx.x; i < kBins; i += kThreads) sh.hist[i] = 0;
  __syncthreads();
  const bool all = shift + kRadixBits >= 64;
  for_each_candidate(p, b, base, [&](uint64_t key) {
    if (all || (key >> (shift + kRadixBits)) == prefix) atomicAdd(&sh.hist[(key >> shift) & (kBins - 1)], 1u);
  });
  __syncthreads();
}

// Thread 0 picks the bin that holds the need-th key of the current prefix; every thread reads it back.
__device__ void choose_bin(Shared& sh, uint64_t* prefix, uint32_t* need, uint32_t* bucket) {
  if (threadIdx.x == 0) {
    uint32_t before = 0;
    int d = 0;
    for (; d < kBins - 1 && before + sh.hist[d] < *need; ++d) before += sh.hist[d];
    sh.prefix = (*prefix << kRadixBits) | static_cast<uint64_t>(d);
    sh.need = *need - before;
    sh.bucket = sh.hist[d];
  }
  __syncthreads();
  *prefix = sh.prefix;
  *need = sh.need;
  *bucket = sh.bucket;
  __syncthreads();
}

// Stores every key for which keep(key) holds into out[0, ..) (slots by a shared counter); returns the count.
template <class Keep>
__device__ uint32_t gather(const Problem& p, int64_t b, const uint32_t* base, Shared& sh, uint64_t* out, Keep keep) {
  if (threadIdx.x == 0) sh.count = 0;
  __syncthreads();
  for_each_candidate(p, b, base, [&](uint64_t key) {
    if (keep(key)) out[atomicAdd(&sh.count, 1u)] = key;
  });
  __syncthreads();
  return sh.count;
}

// The k-th smallest key of a row with `total` > k candidates (radix select, see the file comment).
__device__ uint64_t kth_key(const Problem& p, int64_t b, const uint32_t* base, Shared& sh) {
  uint64_t prefix = 0;
  uint32_t need = static_cast<uint32_t>(p.k), bucket = 0;
  int shift = 64 - kRadixBits;  // sh.hist holds the top digit's histogram already
  for (;;) {
    choose_bin(sh, &prefix, &need, &bucket);
    if (bucket <= kSharedKeys || shift == 0) break;  // shift 0: one key (keys are unique)
    shift -= kRadixBits;
    histogram(p, b, base, sh, shift, prefix);
  }
  const int s = shift;
  const uint64_t pre = prefix;
  const uint32_t n = gather(p, b, base, sh, sh.keys, [=](uint64_t key) { return (key >> s) == pre; });
  sort_keys(sh.keys, n);
  if (threadIdx.x == 0) sh.cut = sh.keys[need - 1];
  __syncthreads();
  const uint64_t cut = sh.cut;
  __syncthreads();  // sh.keys is reused by the caller
  return cut;
}

__global__ void __launch_bounds__(kThreads) trie_topk_kernel(Problem p, Workspace ws) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0) sh.bad = 0;
  __syncthreads();
  if (!validate_row_device(p, b, ws.status, &sh.bad)) return;
  uint32_t* base = ws.base + b * p.k_in;
  const uint64_t edges = row_bases(p, b, base, sh);
  if (edges >= (uint64_t(1) << 32)) {
    if (threadIdx.x == 0) atomicCAS(ws.status, 0, kTooManyCandidates);
    return;
  }
  histogram(p, b, base, sh, 64 - kRadixBits, 0);  // top digit; also gives the number of candidates
  if (threadIdx.x == 0) {
    uint32_t total = 0;
    for (int i = 0; i < kBins; ++i) total += sh.hist[i];
    sh.count = total;
  }
  __syncthreads();
  const int64_t total = sh.count;
  __syncthreads();
  const int64_t n = total < p.k ? total : p.k;  // outputs that are not padding
  const bool in_shared = (total <= kSharedKeys) || (p.k <= kSharedKeys);
  uint64_t* keys = in_shared ? sh.keys : ws.keys + b * ws.keys_stride;
  if (total <= kSharedKeys || total <= p.k) {  // every candidate is kept (or sorted in shared memory)
    gather(p, b, base, sh, keys, [](uint64_t) { return true; });
    sort_keys(keys, total);
  } else {
    const uint64_t cut = kth_key(p, b, base, sh);
    gather(p, b, base, sh, keys, [=](uint64_t key) { return key <= cut; });
    sort_keys(keys, n);
  }
  write_row(p, b, base, keys, n);
}

// ---- beam-state kernels ----

template <class Word>
__global__ void copy_slots_kernel(Word* dst, const Word* src, int64_t rows, int64_t dst_slots, int64_t dst_at,
                                  int64_t src_slots, int64_t src_at, int64_t n, int64_t words) {
  const int64_t total = rows * n * words;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = i % words, s = (i / words) % n, r = i / (words * n);
    dst[(r * dst_slots + dst_at + s) * words + w] = src[(r * src_slots + src_at + s) * words + w];
  }
}

template <class Word>
__global__ void gather_beams_kernel(Word* dst, const Word* src, const int32_t* parent, int64_t outer, int64_t batch,
                                    int64_t heads, int64_t beams, int64_t words) {
  const int64_t total = outer * batch * heads * beams * words;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = i % words;
    int64_t rest = i / words;
    const int64_t k = rest % beams;
    rest /= beams;
    const int64_t b = (rest / heads) % batch;
    const int32_t from = parent[b * beams + k];
    const int64_t row = rest * beams + (from > 0 ? from : 0);  // (o, b, h) row, parent's slot
    dst[i] = src[row * words + w];
  }
}

__global__ void tokens_to_codes_kernel(int64_t* dst, const int32_t* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = src[i] > 0 ? src[i] : 0;
}

__global__ void probe_kernel(int32_t* out) { *out = 42; }

}  // namespace kernels
}  // namespace trie_topk
}  // namespace pauserec
