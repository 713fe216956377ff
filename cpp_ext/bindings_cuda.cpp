// pauserec._trie_topk_cuda: Python entry points of the CUDA trie-masked top-k (compiled by the host
// compiler; the kernels live in trie_topk_cuda.cu). Importing never needs a GPU or a driver: the
// CUDA runtime is linked statically and finds the driver lazily. Calls without a usable device raise
// RuntimeError; bad input raises ValueError.
#include <pybind11/pybind11.h>

#include <string>

#include "trie_topk.h"
#include "trie_topk_py.h"

namespace pauserec {
namespace trie_topk {
namespace {

void raise_for(const cuda::Result& r) {
  if (r.kind == cuda::kInvalidInput) throw py::value_error(r.message);
  if (r.kind != cuda::kDone)
    throw std::runtime_error("CUDA trie-masked top-k failed: " + r.message +
                             ". Use impl='cpu' (or 'auto') where no CUDA GPU is usable.");
}

bool cuda_available() { return cuda::device_usable(nullptr); }

std::string unavailable_reason() {
  std::string why;
  return cuda::device_usable(&why) ? std::string() : why;
}

py::tuple trie_topk_host(const py::handle& scores, const py::handle& logprobs, const py::handle& nodes,
                         const py::handle& offsets, const py::handle& tokens, const py::handle& children, int64_t k,
                         const py::object& node_mask, const py::object& mask_row) {
  Inputs in = parse_inputs(scores, logprobs, nodes, offsets, tokens, children, k, node_mask, mask_row);
  Outputs out = make_outputs(in.problem);
  cuda::Result r;
  {
    py::gil_scoped_release release;
    r = cuda::run_host(in.problem);
  }
  raise_for(r);
  return as_tuple(out);
}

template <class T>
T* device_ptr(uintptr_t address, int64_t count, const char* name) {
  if (count > 0 && address == 0) throw py::value_error(std::string(name) + " is a null device pointer");
  return reinterpret_cast<T*>(address);
}

void trie_topk_device(uintptr_t scores, uintptr_t logprobs, uintptr_t nodes, uintptr_t offsets, uintptr_t tokens,
                      uintptr_t children, int64_t batch, int64_t k_in, int64_t vocab, int64_t num_nodes,
                      int64_t num_edges, int64_t k, uintptr_t out_parent, uintptr_t out_token, uintptr_t out_node,
                      uintptr_t out_score, uintptr_t stream, uintptr_t node_mask, uintptr_t mask_row,
                      int64_t mask_rows) {
  if (batch < 0 || k_in < 1 || k_in > INT32_MAX || vocab < 1 || vocab > INT32_MAX || num_nodes < 0 ||
      num_nodes > INT32_MAX || num_edges < 0 || num_edges > INT32_MAX)
    throw py::value_error("need batch >= 0, 1 <= K_in, V < 2**31 and 0 <= N, E < 2**31");
  if (k < 1 || k > kMaxK)
    throw py::value_error("k must be in [1, " + std::to_string(kMaxK) + "], got " + std::to_string(k));
  if ((node_mask == 0) != (mask_row == 0) || mask_rows < 0)
    throw py::value_error("pass node_mask and mask_row together (or neither), with mask_rows = M >= 0");
  Problem p{};
  const int64_t bk = batch * k_in, out = batch * k;
  p.scores = device_ptr<const float>(scores, bk, "scores");
  p.logprobs = device_ptr<const float>(logprobs, bk * vocab, "logprobs");
  p.nodes = device_ptr<const int32_t>(nodes, bk, "nodes");
  p.trie = TrieView{device_ptr<const int32_t>(offsets, num_nodes + 1, "offsets"),
                    device_ptr<const int32_t>(tokens, num_edges, "tokens"),
                    device_ptr<const int32_t>(children, num_edges, "children"), num_nodes, num_edges};
  p.batch = batch;
  p.k_in = k_in;
  p.vocab = vocab;
  p.k = k;
  p.out_parent = device_ptr<int32_t>(out_parent, out, "out_parent");
  p.out_token = device_ptr<int32_t>(out_token, out, "out_token");
  p.out_node = device_ptr<int32_t>(out_node, out, "out_node");
  p.out_score = device_ptr<float>(out_score, out, "out_score");
  if (mask_row != 0) {  // checked on the device: mask_row values in [-1, mask_rows)
    p.node_mask = reinterpret_cast<const uint8_t*>(node_mask);
    p.mask_row = reinterpret_cast<const int32_t*>(mask_row);
    p.mask_rows = mask_rows;
  }
  cuda::Result r;
  {
    py::gil_scoped_release release;
    r = cuda::run_device(p, stream);
  }
  raise_for(r);
}

}  // namespace
}  // namespace trie_topk
}  // namespace pauserec

PYBIND11_MODULE(_trie_topk_cuda, m) {
  namespace tt = pauserec::trie_topk;
  using pybind11::arg;
  m.doc() = "Private: CUDA trie-masked top-k. Use pauserec.runtime.trie_topk instead.";
  m.def("cuda_available", &tt::cuda_available, "True when a CUDA driver and at least one device are usable.");
  m.def("unavailable_reason", &tt::unavailable_reason, "Why CUDA is not usable ('' when it is).");
  m.def("trie_topk", &tt::trie_topk_host, tt::kDoc, arg("scores"), arg("logprobs"), arg("nodes"), arg("offsets"),
        arg("tokens"), arg("children"), arg("k"), arg("node_mask") = pybind11::none(),
        arg("mask_row") = pybind11::none());
  m.def("trie_topk_device", &tt::trie_topk_device,
        "Same computation on device memory (C-contiguous, int32/float32), e.g. IO-bound ORT buffers.\n"
        "Outputs are (B, k) device buffers the caller owns; synchronises `stream` (0 = default stream).\n"
        "Optional filter: node_mask (mask_rows, num_nodes) uint8 and mask_row (batch,) int32 device buffers.",
        arg("scores"), arg("logprobs"), arg("nodes"), arg("offsets"), arg("tokens"), arg("children"), arg("batch"),
        arg("k_in"), arg("vocab"), arg("num_nodes"), arg("num_edges"), arg("k"), arg("out_parent"), arg("out_token"),
        arg("out_node"), arg("out_score"), arg("stream") = 0, arg("node_mask") = 0, arg("mask_row") = 0,
        arg("mask_rows") = 0);
  m.attr("MAX_K") = tt::kMaxK;
}
