// pauserec._trie_topk_cpu: trie-masked top-k on the CPU (single thread, GIL released).
//
// Per row: scan the candidates in (parent, token) order, checking each referenced node's edges first.
// A candidate is kept only when it scores strictly above the k-th best score seen so far (ties lose:
// everything kept came earlier in (parent, token) order). Kept candidates are appended to a small
// buffer; when it fills, nth_element trims it back to the best k and raises the threshold. The hot
// loop is a few loads, one float add and one compare; the buffer work is linear and amortised.
// Filtered rows (a node_mask row) run the same loop compiled with one more test, on candidates that
// already beat the threshold: the child's mask byte.
#include <algorithm>
#include <vector>

#include "trie_topk.h"
#include "trie_topk_py.h"

#ifndef PAUSEREC_BUILT_WITH_CUDA
#define PAUSEREC_BUILT_WITH_CUDA 0
#endif

namespace pauserec {
namespace trie_topk {
namespace {

struct Better {
  bool operator()(const Candidate& a, const Candidate& b) const { return better(a, b); }
};

// Candidates that pass the threshold are appended to a buffer of buffer_size(k) slots; when it is
// full, the best k are kept (nth_element, linear time) and the threshold rises to the k-th best score.
inline int64_t buffer_size(int64_t k) { return std::max<int64_t>(2 * k, k + 64); }

// Keeps the best k of buf[0, *n) in buf[0, k) (unordered); returns the k-th best score.
inline float keep_best(Candidate* buf, int64_t* n, int64_t k) {
  std::nth_element(buf, buf + (k - 1), buf + *n, Better{});
  *n = k;
  return buf[k - 1].score;
}

// Branch-free checks of one node's n edges: tokens strictly increasing in [0, V), children in
// [0, N). The failing edge, if any, is found again by edge_error.
inline bool edges_ok(const int32_t* tok, const int32_t* child, int64_t n, uint32_t V, uint32_t N) {
  uint32_t bad = 0;
  int32_t prev = -1;  // tokens are >= 0 once the range check passes
  for (int64_t i = 0; i < n; ++i) {
    bad |= static_cast<uint32_t>(static_cast<uint32_t>(tok[i]) >= V) |
           static_cast<uint32_t>(static_cast<uint32_t>(child[i]) >= N) | static_cast<uint32_t>(tok[i] <= prev);
    prev = tok[i];
  }
  return bad == 0;
}

// Re-runs the checks of one node's edges to name the first failure (cold path).
ErrorInfo edge_error(const Problem& p, int64_t b, int64_t j, int32_t node, int64_t lo, int64_t hi) {
  for (int64_t e = lo; e < hi; ++e) {
    const int32_t st = check_edge(p.trie, e, lo, p.vocab);
    if (st != kOk) return ErrorInfo{st, b, j, node, e, st == kBadChild ? p.trie.children[e] : p.trie.tokens[e]};
  }
  return ErrorInfo{};
}

// Validates and scores row b; writes its k outputs. Returns a non-OK ErrorInfo on bad input.
// kMasked: the row has a node_mask row `mask` (children with mask byte 0 are never candidates).
template <bool kMasked>
ErrorInfo topk_row(const Problem& p, int64_t b, Candidate* buf, const uint8_t* mask) {
  const int64_t K = p.k_in, k = p.k;
  const uint32_t V = static_cast<uint32_t>(p.vocab), N = static_cast<uint32_t>(p.trie.num_nodes);
  const float* scores = p.scores + b * K;
  const int32_t* nodes = p.nodes + b * K;
  const float* logprobs = p.logprobs + b * K * p.vocab;
  const int32_t* tokens = p.trie.tokens;
  const int32_t* children = p.trie.children;
  const int64_t cap = buffer_size(k);
  int64_t n = 0;
  float threshold = -INFINITY;  // candidates must score above this: the k-th best score seen so far
  for (int64_t j = 0; j < K; ++j) {
    int64_t lo, hi;
    const int32_t st = node_edges(p.trie, nodes[j], &lo, &hi);
    if (st != kOk) return ErrorInfo{st, b, j, nodes[j], -1, nodes[j]};
    if (!edges_ok(tokens + lo, children + lo, hi - lo, V, N)) return edge_error(p, b, j, nodes[j], lo, hi);
    const float ps = scores[j];
    if (!live_score(ps)) continue;  // a dead parent expands nothing (its edges are still checked)
    const float* lp = logprobs + j * p.vocab;  // (V,)
    for (int64_t e = lo; e < hi; ++e) {
      const int32_t tok = tokens[e];
      const float s = candidate_score(ps, lp[tok]);
      // Ties with the threshold lose: the k candidates that set it all came earlier in scan order.
      if (!(s > threshold)) continue;  // also drops -inf and NaN
      if (kMasked && mask[children[e]] == 0) continue;  // a masked edge does not exist
      buf[n++] = Candidate{s, static_cast<int32_t>(j), tok, static_cast<int32_t>(e)};
      if (n == cap) threshold = keep_best(buf, &n, k);
    }
  }
  if (n > k) keep_best(buf, &n, k);
  std::sort(buf, buf + n, Better{});  // best first
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = b * k + i;
    p.out_parent[o] = buf[i].parent;
    p.out_token[o] = buf[i].token;
    p.out_node[o] = children[buf[i].edge];
    p.out_score[o] = buf[i].score;
  }
  write_padding(p, b, n);
  return ErrorInfo{};
}

ErrorInfo run_cpu(const Problem& p) {
  // One buffer per thread, reused across calls. A row never appends more than K_in * V candidates
  // (tokens are checked to be strictly increasing in [0, V) before a candidate is appended), so
  // K_in * V + 1 slots suffice when that is less than buffer_size(k).
  thread_local std::vector<Candidate> buf;
  const int64_t size = std::min<int64_t>(buffer_size(p.k), p.k_in * p.vocab + 1);
  if (static_cast<int64_t>(buf.size()) < size) buf.resize(static_cast<size_t>(size));
  for (int64_t b = 0; b < p.batch; ++b) {
    if (check_mask_row(p, b) != kOk) return ErrorInfo{kBadMaskRow, b, -1, -1, -1, p.mask_row[b]};
    const uint8_t* mask = row_mask(p, b);
    ErrorInfo err = mask ? topk_row<true>(p, b, buf.data(), mask) : topk_row<false>(p, b, buf.data(), nullptr);
    if (err.status != kOk) return err;
  }
  return ErrorInfo{};
}

py::tuple trie_topk_py(const py::handle& scores, const py::handle& logprobs, const py::handle& nodes,
                       const py::handle& offsets, const py::handle& tokens, const py::handle& children, int64_t k,
                       const py::object& node_mask, const py::object& mask_row) {
  Inputs in = parse_inputs(scores, logprobs, nodes, offsets, tokens, children, k, node_mask, mask_row);
  Outputs out = make_outputs(in.problem);
  ErrorInfo err;
  {
    py::gil_scoped_release release;
    err = run_cpu(in.problem);
  }
  if (err.status != kOk) throw py::value_error(error_message(err, in.problem));
  return as_tuple(out);
}

}  // namespace
}  // namespace trie_topk
}  // namespace pauserec

PYBIND11_MODULE(_trie_topk_cpu, m) {
  namespace tt = pauserec::trie_topk;
  m.doc() = "Private: native CPU trie-masked top-k. Use pauserec.runtime.trie_topk instead.";
  m.def("trie_topk", &tt::trie_topk_py, tt::kDoc, pybind11::arg("scores"), pybind11::arg("logprobs"),
        pybind11::arg("nodes"), pybind11::arg("offsets"), pybind11::arg("tokens"), pybind11::arg("children"),
        pybind11::arg("k"), pybind11::arg("node_mask") = pybind11::none(), pybind11::arg("mask_row") = pybind11::none());
  m.attr("built_with_cuda") = pybind11::bool_(PAUSEREC_BUILT_WITH_CUDA != 0);
  m.attr("MAX_K") = tt::kMaxK;
}
