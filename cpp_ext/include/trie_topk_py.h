// Argument checking shared by the pybind11 modules _trie_topk_cpu and _trie_topk_cuda.
// Bad shapes, dtypes or k raise ValueError; inputs are made C-contiguous (copied only when needed).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "trie_topk.h"

namespace pauserec {
namespace trie_topk {
namespace py = pybind11;

template <class T>
using CArray = py::array_t<T, py::array::c_style>;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <class T>
CArray<T> checked_array(const py::handle& h, const char* name, const char* dtype_name, int ndim) {
  if (!py::isinstance<py::array>(h))
    throw py::value_error(std::string(name) + " must be a numpy array of " + dtype_name + ", got " +
                          py::str(py::type::handle_of(h)).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(h);
  if (!py::isinstance<py::array_t<T>>(h))
    throw py::value_error(std::string(name) + " must have dtype " + dtype_name + ", got " +
                          py::str(a.dtype()).cast<std::string>() + ": convert it with .astype(np." + dtype_name + ")");
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
  if (a.flags() & py::array::c_style) return py::reinterpret_borrow<CArray<T>>(a);  // no copy, no conversion
  auto c = CArray<T>::ensure(a);
  if (!c) throw py::error_already_set();
  return c;
}

// Holds the (contiguous) inputs alive and describes them as a Problem (outputs unset).
struct Inputs {
  CArray<float> scores, logprobs;
  CArray<int32_t> nodes, offsets, tokens, children;
  CArray<uint8_t> node_mask;  // empty handles when unfiltered
  CArray<int32_t> mask_row;
  Problem problem{};
};

// The optional node filter: node_mask (M, N) uint8 and mask_row (B,) int32, both or neither; every
// mask_row value in [-1, M) (checked here, before any trie check, as the NumPy reference does).
inline void parse_mask(Inputs& in, const py::handle& node_mask, const py::handle& mask_row) {
  if (node_mask.is_none() && mask_row.is_none()) return;
  if (node_mask.is_none() || mask_row.is_none()) {
    const std::string given = mask_row.is_none() ? "node_mask" : "mask_row";
    const std::string missing = mask_row.is_none() ? "mask_row" : "node_mask";
    throw py::value_error(given + " was given without " + missing +
                          ": pass both (mask_row (B,) int32 picks a row of node_mask (M, N) uint8 for each batch "
                          "row, -1 = unfiltered), or neither");
  }
  in.node_mask = checked_array<uint8_t>(node_mask, "node_mask", "uint8", 2);
  in.mask_row = checked_array<int32_t>(mask_row, "mask_row", "int32", 1);
  const int64_t B = in.scores.shape(0), N = in.offsets.shape(0) - 1, M = in.node_mask.shape(0);
  if (in.node_mask.shape(1) != N)
    throw py::value_error("node_mask must have shape (M, N) with N = " + std::to_string(N) + " trie nodes, got " +
                          shape_str(in.node_mask));
  if (in.mask_row.shape(0) != B)
    throw py::value_error("mask_row must have shape (B,) = (" + std::to_string(B) + ",) to match scores, got " +
                          shape_str(in.mask_row));
  const int32_t* rows = in.mask_row.data();
  for (int64_t b = 0; b < B; ++b) {
    if (rows[b] < -1 || rows[b] >= M)
      throw py::value_error("mask_row[" + std::to_string(b) + "] = " + std::to_string(rows[b]) + " is outside [-1, " +
                            std::to_string(M) + "): pass a row of node_mask (-1 = unfiltered)");
  }
  in.problem.node_mask = in.node_mask.data();
  in.problem.mask_row = rows;
  in.problem.mask_rows = M;
}

inline Inputs parse_inputs(const py::handle& scores, const py::handle& logprobs, const py::handle& nodes,
                           const py::handle& offsets, const py::handle& tokens, const py::handle& children,
                           int64_t k, const py::handle& node_mask = py::none(),
                           const py::handle& mask_row = py::none()) {
  Inputs in;
  in.scores = checked_array<float>(scores, "scores", "float32", 2);
  in.logprobs = checked_array<float>(logprobs, "logprobs", "float32", 3);
  in.nodes = checked_array<int32_t>(nodes, "nodes", "int32", 2);
  in.offsets = checked_array<int32_t>(offsets, "offsets", "int32", 1);
  in.tokens = checked_array<int32_t>(tokens, "tokens", "int32", 1);
  in.children = checked_array<int32_t>(children, "children", "int32", 1);

  const int64_t B = in.scores.shape(0), K = in.scores.shape(1), V = in.logprobs.shape(2);
  if (K < 1 || K > INT32_MAX)
    throw py::value_error("scores must have shape (B, K_in) with 1 <= K_in < 2**31, got " + shape_str(in.scores));
  if (in.logprobs.shape(0) != B || in.logprobs.shape(1) != K || V < 1 || V > INT32_MAX)
    throw py::value_error("logprobs must have shape (B, K_in, V) = (" + std::to_string(B) + ", " + std::to_string(K) +
                          ", V >= 1) to match scores, got " + shape_str(in.logprobs));
  if (in.nodes.shape(0) != B || in.nodes.shape(1) != K)
    throw py::value_error("nodes must have the shape of scores " + shape_str(in.scores) + ", got " +
                          shape_str(in.nodes));
  if (in.offsets.shape(0) < 1 || in.offsets.shape(0) - 1 > INT32_MAX)
    throw py::value_error("offsets must have shape (N + 1,) with N >= 0 trie nodes, got " + shape_str(in.offsets));
  if (in.tokens.shape(0) != in.children.shape(0) || in.tokens.shape(0) > INT32_MAX)
    throw py::value_error("tokens and children must have the same shape (E,), got " + shape_str(in.tokens) + " and " +
                          shape_str(in.children));
  if (k < 1 || k > kMaxK)
    throw py::value_error("k must be in [1, " + std::to_string(kMaxK) + "] (the number of beams to keep), got " +
                          std::to_string(k));

  Problem& p = in.problem;
  p.scores = in.scores.data();
  p.logprobs = in.logprobs.data();
  p.nodes = in.nodes.data();
  p.trie = TrieView{in.offsets.data(), in.tokens.data(), in.children.data(), in.offsets.shape(0) - 1,
                    in.tokens.shape(0)};
  p.batch = B;
  p.k_in = K;
  p.vocab = V;
  p.k = k;
  parse_mask(in, node_mask, mask_row);
  return in;
}

struct Outputs {
  CArray<int32_t> parent, token, node;
  CArray<float> score;
};

// Allocates (B, k) outputs and points the problem at them.
inline Outputs make_outputs(Problem& p) {
  const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(p.batch), static_cast<py::ssize_t>(p.k)};
  Outputs out{CArray<int32_t>(shape), CArray<int32_t>(shape), CArray<int32_t>(shape), CArray<float>(shape)};
  p.out_parent = out.parent.mutable_data();
  p.out_token = out.token.mutable_data();
  p.out_node = out.node.mutable_data();
  p.out_score = out.score.mutable_data();
  return out;
}

inline py::tuple as_tuple(const Outputs& o) { return py::make_tuple(o.parent, o.token, o.node, o.score); }

constexpr const char* kDoc =
    "trie_topk(scores, logprobs, nodes, offsets, tokens, children, k, node_mask=None, mask_row=None)\n"
    "    -> (parent, token, node, score)\n\n"
    "Trie-masked top-k over one decoding level, optionally under a node filter (node_mask (M, N) uint8,\n"
    "mask_row (B,) int32). Private: call pauserec.runtime.trie_topk.trie_topk, whose NumPy reference\n"
    "docstring pins the semantics. Bad shapes, dtypes or ids raise ValueError.";

}  // namespace trie_topk
}  // namespace pauserec
