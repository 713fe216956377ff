// Trie-masked top-k: the per-row rule shared by the C++ CPU and CUDA implementations.
//
// The semantics are pinned in the NumPy reference (pauserec.runtime.trie_topk.trie_topk_numpy);
// this header is their native spelling:
//   * candidates of row b are the pairs (parent j, edge e of node nodes[b, j]); with a node filter
//     (node_mask (M, N) uint8 + mask_row (B,) int32) and m = mask_row[b] != -1, only the edges whose
//     child has node_mask[m, children[e]] != 0 (a masked edge is treated as if it did not exist);
//   * score = scores[b, j] + logprobs[b, j, tokens[e]], float32 addition; NaN counts as -inf;
//   * a candidate whose score is -inf is never selected (so dead parents expand nothing);
//   * order: higher score first; ties -> lower parent, then lower token;
//   * fewer than k candidates -> padding (parent, token, node = -1, score = -inf).
// Every referenced node (nodes[b, j] != -1, whatever its score) must be in [0, N), have a sane edge
// range, tokens strictly increasing in [0, V) and children in [0, N), and every mask_row value must
// be in [-1, M); otherwise the call fails. node_mask bytes are not inspected (nonzero = enterable).
//
// Never compile this code with fast-math: the NaN test and the exact float addition matter.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define PAUSEREC_HD __host__ __device__
#else
#define PAUSEREC_HD
#endif

namespace pauserec {
namespace trie_topk {

// Beam widths above this are rejected as a likely mistake (they would only allocate padding).
constexpr int64_t kMaxK = int64_t(1) << 20;

struct Candidate {
  float score;     // already normalised by candidate_score (never NaN)
  int32_t parent;  // beam index j in [0, K_in)
  int32_t token;   // level-local code
  int32_t edge;    // edge id e; the output node is children[edge]
};

// score of one candidate; NaN -> -inf
PAUSEREC_HD inline float candidate_score(float parent_score, float logprob) {
  const float s = parent_score + logprob;
  return (s > -INFINITY) ? s : -INFINITY;
}

// A parent whose score is -inf or NaN expands nothing (every child score would be -inf or NaN).
PAUSEREC_HD inline bool live_score(float s) { return s > -INFINITY; }

// The one ordering: higher score, then lower parent, then lower token. Scores must be normalised.
PAUSEREC_HD inline bool better(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  if (a.parent != b.parent) return a.parent < b.parent;
  return a.token < b.token;
}

// ---- problem description (raw pointers, C-contiguous) ----

struct TrieView {
  const int32_t* offsets;   // (N + 1,)
  const int32_t* tokens;    // (E,)
  const int32_t* children;  // (E,)
  int64_t num_nodes;        // N
  int64_t num_edges;        // E
};

struct Problem {
  const float* scores;    // (B, K_in)
  const float* logprobs;  // (B, K_in, V)
  const int32_t* nodes;   // (B, K_in)
  TrieView trie;
  int64_t batch;   // B
  int64_t k_in;    // K_in
  int64_t vocab;   // V
  int64_t k;       // k
  // optional node filter (both null = unfiltered): row mask_row[b] of node_mask, -1 = unfiltered
  const uint8_t* node_mask = nullptr;  // (M, N), nonzero = the node may be entered
  const int32_t* mask_row = nullptr;   // (B,)
  int64_t mask_rows = 0;               // M
  int32_t* out_parent;  // (B, k)
  int32_t* out_token;   // (B, k)
  int32_t* out_node;    // (B, k)
  float* out_score;     // (B, k)
};

// ---- validation helpers ----

enum Status : int32_t {
  kOk = 0,
  kBadNode = 1,      // node id outside [-1, N)
  kBadOffsets = 2,   // edge range of a node outside [0, E] or reversed
  kBadToken = 3,     // trie token outside [0, V)
  kUnsorted = 4,     // trie tokens of one node not strictly increasing
  kBadChild = 5,     // trie child outside [0, N)
  kBadMaskRow = 6,   // mask_row value outside [-1, M)
  kTooManyCandidates = 7,  // CUDA only: a row's referenced nodes have more than 2**32 edges in all
};

struct ErrorInfo {
  int32_t status = kOk;
  int64_t row = -1, beam = -1, node = -1, edge = -1, value = 0;
};

// Checks the node id of one beam and returns its edge range [*begin, *end) (empty for node -1).
PAUSEREC_HD inline int32_t node_edges(const TrieView& t, int32_t node, int64_t* begin, int64_t* end) {
  *begin = 0;
  *end = 0;
  if (node == -1) return kOk;
  if (node < -1 || node >= t.num_nodes) return kBadNode;
  const int64_t lo = t.offsets[node], hi = t.offsets[node + 1];
  if (lo < 0 || hi < lo || hi > t.num_edges) return kBadOffsets;
  *begin = lo;
  *end = hi;
  return kOk;
}

// Checks edge e of a node whose edges start at begin.
PAUSEREC_HD inline int32_t check_edge(const TrieView& t, int64_t e, int64_t begin, int64_t vocab) {
  const int32_t tok = t.tokens[e];
  if (tok < 0 || tok >= vocab) return kBadToken;
  if (e > begin && tok <= t.tokens[e - 1]) return kUnsorted;
  const int32_t child = t.children[e];
  if (child < 0 || child >= t.num_nodes) return kBadChild;
  return kOk;
}

// Checks the mask row of batch row b (always fine without a filter).
PAUSEREC_HD inline int32_t check_mask_row(const Problem& p, int64_t b) {
  if (p.mask_row == nullptr) return kOk;
  const int32_t m = p.mask_row[b];
  return (m < -1 || m >= p.mask_rows) ? kBadMaskRow : kOk;
}

// The node_mask row batch row b uses, or nullptr when it is unfiltered (mask row already checked).
PAUSEREC_HD inline const uint8_t* row_mask(const Problem& p, int64_t b) {
  if (p.mask_row == nullptr || p.node_mask == nullptr) return nullptr;
  const int32_t m = p.mask_row[b];
  return m < 0 ? nullptr : p.node_mask + static_cast<int64_t>(m) * p.trie.num_nodes;
}

// Whether the search may enter `child` under a row mask (nullptr = unfiltered: always).
PAUSEREC_HD inline bool enterable(const uint8_t* mask, int32_t child) { return mask == nullptr || mask[child] != 0; }

PAUSEREC_HD inline void write_padding(const Problem& p, int64_t row, int64_t from) {
  for (int64_t i = from; i < p.k; ++i) {
    const int64_t o = row * p.k + i;
    p.out_parent[o] = -1;
    p.out_token[o] = -1;
    p.out_node[o] = -1;
    p.out_score[o] = -INFINITY;
  }
}

// Host-only: validates every referenced node and edge of one row, in row-major beam/edge order.
inline ErrorInfo validate_row(const Problem& p, int64_t b) {
  ErrorInfo info;
  if (check_mask_row(p, b) != kOk) return ErrorInfo{kBadMaskRow, b, -1, -1, -1, p.mask_row[b]};
  for (int64_t j = 0; j < p.k_in; ++j) {
    const int32_t node = p.nodes[b * p.k_in + j];
    int64_t lo, hi;
    int32_t st = node_edges(p.trie, node, &lo, &hi);
    if (st != kOk) return ErrorInfo{st, b, j, node, -1, node};
    for (int64_t e = lo; e < hi; ++e) {
      st = check_edge(p.trie, e, lo, p.vocab);
      if (st != kOk) return ErrorInfo{st, b, j, node, e, st == kBadChild ? p.trie.children[e] : p.trie.tokens[e]};
    }
  }
  return info;
}

inline ErrorInfo validate_all(const Problem& p) {
  for (int64_t b = 0; b < p.batch; ++b) {  // mask rows first, as the NumPy reference checks them
    if (check_mask_row(p, b) != kOk) return ErrorInfo{kBadMaskRow, b, -1, -1, -1, p.mask_row[b]};
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    ErrorInfo info = validate_row(p, b);
    if (info.status != kOk) return info;
  }
  return ErrorInfo{};
}

// One message per failure: what was wrong and what to do next.
inline std::string error_message(const ErrorInfo& e, const Problem& p) {
  const std::string at = "nodes[" + std::to_string(e.row) + ", " + std::to_string(e.beam) + "]";
  const std::string n = std::to_string(p.trie.num_nodes);
  switch (e.status) {
    case kBadNode:
      return at + " = " + std::to_string(e.value) + " is outside [-1, " + n +
             "): pass trie node ids of this trie (-1 for a dead beam)";
    case kBadOffsets:
      return "offsets of node " + std::to_string(e.node) + " (" + at + ") give an edge range outside [0, " +
             std::to_string(p.trie.num_edges) + "]: offsets must be non-decreasing CSR offsets into tokens/children";
    case kBadToken:
      return "trie token " + std::to_string(e.value) + " at edge " + std::to_string(e.edge) + " (child of node " +
             std::to_string(e.node) + ", " + at + ") is outside [0, V=" + std::to_string(p.vocab) +
             "): logprobs must cover this level's codebook";
    case kUnsorted:
      return "trie tokens of node " + std::to_string(e.node) + " are not strictly increasing at edge " +
             std::to_string(e.edge) + ": a node's children must be sorted by code, without repeats";
    case kBadChild:
      return "trie child " + std::to_string(e.value) + " at edge " + std::to_string(e.edge) +
             " is outside [0, " + n + "): children must be node ids of this trie";
    case kBadMaskRow:
      return "mask_row[" + std::to_string(e.row) + "] = " + std::to_string(e.value) + " is outside [-1, " +
             std::to_string(p.mask_rows) + "): pass a row of node_mask (-1 = unfiltered)";
    default:
      return "invalid trie-masked top-k input";
  }
}

// ---- CUDA entry points (defined in trie_topk_cuda.cu; declared here for the CUDA bindings) ----

namespace cuda {
enum ResultKind : int32_t { kDone = 0, kInvalidInput = 1, kRuntimeFailure = 2 };
struct Result {
  int32_t kind = kDone;
  std::string message;
};

// What the module was compiled for, from CMake's CUDA architectures: SASS (cubin) and PTX targets as
// compute capabilities x 10 (e.g. "75,80,86,89,90" and "90"); empty when CMake chose them ("native").
const char* built_sass();
const char* built_ptx();

// Whether the current CUDA device can run this module's kernels: a driver and a device, a compute
// capability covered by the built SASS (same major, minor >= built) or PTX (<= the device's), and one
// test launch. Checked once per process; on false, *why says what is missing and which
// PAUSEREC_CUDA_ARCHS to rebuild with.
bool device_usable(std::string* why);
// Compute capability x 10 of the current device (0 when there is none).
int device_capability();

// The trie resident on one device (uploaded once, reused by every call), a host copy for the exact
// host-side validation messages, and the per-call workspace. Calls are serialised by a mutex; calls
// with sync = false must all use one stream (the workspace is reused in stream order).
class DeviceTrie {
 public:
  static Result create(const TrieView& host, std::unique_ptr<DeviceTrie>* out);
  ~DeviceTrie();
  DeviceTrie(const DeviceTrie&) = delete;
  DeviceTrie& operator=(const DeviceTrie&) = delete;

  int64_t num_nodes() const { return host_.num_nodes; }
  int64_t num_edges() const { return host_.num_edges; }
  int device() const { return device_; }
  TrieView host_view() const { return host_; }

  // p: device pointers for scores/logprobs/nodes/mask/outputs (p.trie is replaced by the resident
  // trie). Validation happens on the device; bad input gives kInvalidInput with a general message.
  // sync = false: returns after the launch; errors surface at the next synchronize().
  Result run_device(Problem p, uintptr_t stream, bool sync);
  // Host arrays in and out (p.trie ignored): validated on the host first (exact messages), copied
  // to the device, computed, copied back.
  Result run_host(const Problem& host_problem);
  // Waits for `stream` and reports (then clears) a failure of an earlier sync = false call.
  Result synchronize(uintptr_t stream);

 private:
  DeviceTrie() = default;
  Result reserve(const Problem& p);
  TrieView host_{};                  // host copy (owned by host_storage_)
  std::vector<int32_t> host_storage_;
  int32_t* d_trie_ = nullptr;        // offsets | tokens | children on the device
  void* d_work_ = nullptr;           // per-call workspace
  size_t work_bytes_ = 0;
  int32_t* d_status_ = nullptr;      // first failure of any call since the last read (0 = none)
  int device_ = 0;
  std::mutex mutex_;
};

// Beam-state helpers on device memory (all synchronise `stream`):
// dst[r, dst_at + s, :] = src[r, src_at + s, :] for r < rows, s < n; every slot is `width` bytes.
Result copy_slots(void* dst, const void* src, int64_t rows, int64_t dst_slots, int64_t dst_at, int64_t src_slots,
                  int64_t src_at, int64_t n, int64_t width, uintptr_t stream);
// dst[o, b, h, k, :] = src[o, b, h, max(parent[b, k], 0), :] for a (outer, B, H, K, inner bytes) layout.
Result gather_beams(void* dst, const void* src, const int32_t* parent, int64_t outer, int64_t batch, int64_t heads,
                    int64_t beams, int64_t inner, uintptr_t stream);
// dst[i] = max(src[i], 0) as int64: the next decode's codes from this level's tokens (-1 = padding).
Result tokens_to_codes(int64_t* dst, const int32_t* src, int64_t n, uintptr_t stream);
// Plain device memory for the bindings' DeviceArray.
Result allocate(size_t bytes, void** out);
void release(void* ptr);
Result copy(void* dst, const void* src, size_t bytes, int kind);  // kind: cudaMemcpyKind; synchronous
Result zero(void* dst, size_t bytes);                            // cudaMemset to 0; synchronous
}  // namespace cuda

}  // namespace trie_topk
}  // namespace pauserec
