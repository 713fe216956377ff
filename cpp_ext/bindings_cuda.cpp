// pauserec._trie_topk_cuda: Python entry points of the CUDA trie-masked top-k (compiled by the host
// compiler; the kernels live in trie_topk_cuda.cu). Importing never needs a GPU or a driver: the
// CUDA runtime is linked statically and finds the driver lazily. Calls without a usable device, or
// whose launch fails, raise CudaError (a RuntimeError); bad input raises ValueError.
//
//   DeviceTrie(offsets, tokens, children)   the trie resident on the current device, reused by calls:
//       .topk(scores, logprobs, nodes, k, node_mask=None, mask_row=None)       host arrays in and out
//       .topk_device(pointers..., stream=0, sync=True)                        device memory in and out
//   DeviceArray(shape, dtype)                plain device memory (cudaMalloc) with __cuda_array_interface__
//   copy_slots / gather_beams / tokens_to_codes   beam-state moves on device pointers
//   trie_topk(...)                           one-shot host call (uploads the trie every time)
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>  // cudaMemcpyKind

#include <memory>
#include <string>
#include <vector>

#include "trie_topk.h"
#include "trie_topk_py.h"

namespace pauserec {
namespace trie_topk {
namespace {

PyObject* g_cuda_error = nullptr;  // pauserec._trie_topk_cuda.CudaError

void raise_for(const cuda::Result& r) {
  if (r.kind == cuda::kInvalidInput) throw py::value_error(r.message);
  if (r.kind != cuda::kDone) {
    const std::string msg = "CUDA trie-masked top-k failed: " + r.message +
                            ". Use impl='cpu' (or 'auto') where no CUDA GPU is usable.";
    PyErr_SetString(g_cuda_error, msg.c_str());
    throw py::error_already_set();
  }
}

bool cuda_available() { return cuda::device_usable(nullptr); }

std::string unavailable_reason() {
  std::string why;
  return cuda::device_usable(&why) ? std::string() : why;
}

std::vector<int> parse_archs(const std::string& s) {
  std::vector<int> out;
  size_t at = 0;
  while (at < s.size()) {
    size_t end = s.find(',', at);
    if (end == std::string::npos) end = s.size();
    const int v = std::atoi(s.substr(at, end - at).c_str());
    if (v > 0) out.push_back(v);
    at = end + 1;
  }
  return out;
}

py::dict built_archs() {
  py::dict d;
  d["sass"] = parse_archs(cuda::built_sass());
  d["ptx"] = parse_archs(cuda::built_ptx());
  return d;
}

// ---- the resident trie ----

struct PyDeviceTrie {
  std::unique_ptr<cuda::DeviceTrie> trie;
  CArray<int32_t> offsets, tokens, children;  // host arrays for parse_inputs' checks

  PyDeviceTrie(const py::handle& off, const py::handle& tok, const py::handle& chd) {
    offsets = checked_array<int32_t>(off, "offsets", "int32", 1);
    tokens = checked_array<int32_t>(tok, "tokens", "int32", 1);
    children = checked_array<int32_t>(chd, "children", "int32", 1);
    if (offsets.shape(0) < 1 || offsets.shape(0) - 1 > INT32_MAX)
      throw py::value_error("offsets must have shape (N + 1,) with N >= 0 trie nodes, got " + shape_str(offsets));
    if (tokens.shape(0) != children.shape(0) || tokens.shape(0) > INT32_MAX)
      throw py::value_error("tokens and children must have the same shape (E,), got " + shape_str(tokens) + " and " +
                            shape_str(children));
    const TrieView host{offsets.data(), tokens.data(), children.data(), offsets.shape(0) - 1, tokens.shape(0)};
    cuda::Result r;
    {
      py::gil_scoped_release release;
      r = cuda::DeviceTrie::create(host, &trie);
    }
    raise_for(r);
  }

  py::tuple topk(const py::handle& scores, const py::handle& logprobs, const py::handle& nodes, int64_t k,
                 const py::object& node_mask, const py::object& mask_row) {
    Inputs in = parse_inputs(scores, logprobs, nodes, offsets, tokens, children, k, node_mask, mask_row);
    Outputs out = make_outputs(in.problem);
    cuda::Result r;
    {
      py::gil_scoped_release release;
      r = trie->run_host(in.problem);
    }
    raise_for(r);
    return as_tuple(out);
  }

  void topk_device(uintptr_t scores, uintptr_t logprobs, uintptr_t nodes, int64_t batch, int64_t k_in, int64_t vocab,
                   int64_t k, uintptr_t out_parent, uintptr_t out_token, uintptr_t out_node, uintptr_t out_score,
                   uintptr_t stream, uintptr_t node_mask, uintptr_t mask_row, int64_t mask_rows, bool sync);

  void synchronize(uintptr_t stream) {
    cuda::Result r;
    {
      py::gil_scoped_release release;
      r = trie->synchronize(stream);
    }
    raise_for(r);
  }
};

template <class T>
T* device_ptr(uintptr_t address, int64_t count, const char* name) {
  if (count > 0 && address == 0) throw py::value_error(std::string(name) + " is a null device pointer");
  return reinterpret_cast<T*>(address);
}

void PyDeviceTrie::topk_device(uintptr_t scores, uintptr_t logprobs, uintptr_t nodes, int64_t batch, int64_t k_in,
                               int64_t vocab, int64_t k, uintptr_t out_parent, uintptr_t out_token, uintptr_t out_node,
                               uintptr_t out_score, uintptr_t stream, uintptr_t node_mask, uintptr_t mask_row,
                               int64_t mask_rows, bool sync) {
  if (batch < 0 || k_in < 1 || k_in > INT32_MAX || vocab < 1 || vocab > INT32_MAX)
    throw py::value_error("need batch >= 0 and 1 <= K_in, V < 2**31, got batch " + std::to_string(batch) + ", K_in " +
                          std::to_string(k_in) + ", V " + std::to_string(vocab));
  if (k < 1 || k > kMaxK)
    throw py::value_error("k must be in [1, " + std::to_string(kMaxK) + "] (the number of beams to keep), got " +
                          std::to_string(k));
  if ((node_mask == 0) != (mask_row == 0) || mask_rows < 0)
    throw py::value_error("pass node_mask and mask_row together (or neither), with mask_rows = M >= 0");
  Problem p{};
  const int64_t bk = batch * k_in, out = batch * k;
  p.scores = device_ptr<const float>(scores, bk, "scores");
  p.logprobs = device_ptr<const float>(logprobs, bk * vocab, "logprobs");
  p.nodes = device_ptr<const int32_t>(nodes, bk, "nodes");
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
    r = trie->run_device(p, stream, sync);
  }
  raise_for(r);
}

py::tuple trie_topk_host(const py::handle& scores, const py::handle& logprobs, const py::handle& nodes,
                         const py::handle& offsets, const py::handle& tokens, const py::handle& children, int64_t k,
                         const py::object& node_mask, const py::object& mask_row) {
  Inputs in = parse_inputs(scores, logprobs, nodes, offsets, tokens, children, k, node_mask, mask_row);
  Outputs out = make_outputs(in.problem);
  cuda::Result r;
  {
    py::gil_scoped_release release;
    std::unique_ptr<cuda::DeviceTrie> trie;
    r = cuda::DeviceTrie::create(in.problem.trie, &trie);
    if (r.kind == cuda::kDone) r = trie->run_host(in.problem);
  }
  raise_for(r);
  return as_tuple(out);
}

// ---- plain device memory ----

struct DType {
  std::string name;  // numpy name
  std::string typestr;  // __cuda_array_interface__ typestr
  size_t size;
};

DType dtype_of(const std::string& name) {
  static const DType known[] = {{"float32", "<f4", 4}, {"float16", "<f2", 2}, {"int32", "<i4", 4},
                                {"int64", "<i8", 8},   {"uint8", "|u1", 1},   {"int8", "|i1", 1}};
  for (const DType& d : known)
    if (d.name == name) return d;
  throw py::value_error("DeviceArray dtype must be float32, float16, int32, int64, uint8 or int8, got " + name);
}

struct DeviceArray {
  void* ptr = nullptr;
  std::vector<py::ssize_t> shape;
  DType dtype;
  size_t nbytes = 0;

  DeviceArray(const std::vector<py::ssize_t>& shape_, const std::string& dtype_name, bool zero)
      : shape(shape_), dtype(dtype_of(dtype_name)) {
    size_t n = 1;
    for (py::ssize_t d : shape) {
      if (d < 0) throw py::value_error("DeviceArray dimensions must be >= 0");
      n *= static_cast<size_t>(d);
    }
    nbytes = n * dtype.size;
    std::string why;
    if (!cuda::device_usable(&why)) raise_for(cuda::Result{cuda::kRuntimeFailure, why});
    raise_for(cuda::allocate(nbytes, &ptr));
    if (zero) raise_for(cuda::zero(ptr, nbytes));
  }
  ~DeviceArray() { cuda::release(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  void check_host(const py::array& a) const {
    if (py::str(a.dtype()).cast<std::string>() != dtype.name || static_cast<size_t>(a.nbytes()) != nbytes)
      throw py::value_error("host array " + py::str(a.dtype()).cast<std::string>() + shape_str(a) +
                            " does not match the DeviceArray " + dtype.name + " of " + std::to_string(nbytes) + " bytes");
  }

  void upload(const py::array& host) {
    py::array a = py::array::ensure(host, py::array::c_style);
    if (!a) throw py::error_already_set();
    check_host(a);
    raise_for(cuda::copy(ptr, a.data(), nbytes, cudaMemcpyHostToDevice));
  }

  py::array to_numpy() const {
    py::array out(py::dtype(dtype.name), shape);
    raise_for(cuda::copy(out.mutable_data(), ptr, nbytes, cudaMemcpyDeviceToHost));
    return out;
  }

  py::dict interface() const {
    py::dict d;
    d["shape"] = py::tuple(py::cast(shape));
    d["typestr"] = dtype.typestr;
    d["data"] = py::make_tuple(reinterpret_cast<uintptr_t>(ptr), false);
    d["strides"] = py::none();
    d["version"] = 3;
    return d;
  }
};

std::unique_ptr<DeviceArray> from_numpy(const py::array& host) {
  py::array a = py::array::ensure(host, py::array::c_style);
  if (!a) throw py::error_already_set();
  std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
  auto d = std::make_unique<DeviceArray>(shape, py::str(a.dtype()).cast<std::string>(), false);
  d->upload(a);
  return d;
}

// ---- beam-state helpers ----

void copy_slots(uintptr_t dst, uintptr_t src, int64_t rows, int64_t dst_slots, int64_t dst_at, int64_t src_slots,
                int64_t src_at, int64_t n, int64_t width, uintptr_t stream) {
  cuda::Result r;
  {
    py::gil_scoped_release release;
    r = cuda::copy_slots(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), rows, dst_slots, dst_at,
                         src_slots, src_at, n, width, stream);
  }
  raise_for(r);
}

void gather_beams(uintptr_t dst, uintptr_t src, uintptr_t parent, int64_t outer, int64_t batch, int64_t heads,
                  int64_t beams, int64_t inner, uintptr_t stream) {
  cuda::Result r;
  {
    py::gil_scoped_release release;
    r = cuda::gather_beams(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                           reinterpret_cast<const int32_t*>(parent), outer, batch, heads, beams, inner, stream);
  }
  raise_for(r);
}

void tokens_to_codes(uintptr_t dst, uintptr_t src, int64_t n, uintptr_t stream) {
  cuda::Result r;
  {
    py::gil_scoped_release release;
    r = cuda::tokens_to_codes(reinterpret_cast<int64_t*>(dst), reinterpret_cast<const int32_t*>(src), n, stream);
  }
  raise_for(r);
}

}  // namespace
}  // namespace trie_topk
}  // namespace pauserec

PYBIND11_MODULE(_trie_topk_cuda, m) {
  namespace tt = pauserec::trie_topk;
  namespace py = pybind11;
  using py::arg;
  m.doc() = "Private: CUDA trie-masked top-k. Use pauserec.runtime.trie_topk instead.";
  // CudaError: a RuntimeError raised when the device fails (kept alive for the process's lifetime)
  tt::g_cuda_error = PyErr_NewException("pauserec._trie_topk_cuda.CudaError", PyExc_RuntimeError, nullptr);
  if (!tt::g_cuda_error) throw py::error_already_set();
  m.add_object("CudaError", py::handle(tt::g_cuda_error));
  m.def("cuda_available", &tt::cuda_available,
        "True when a CUDA device can run this build (driver, compute capability, one test launch).");
  m.def("unavailable_reason", &tt::unavailable_reason, "Why CUDA is not usable ('' when it is).");
  m.def("built_archs", &tt::built_archs, "{'sass': [...], 'ptx': [...]}: compute capabilities x 10 compiled in.");
  m.def("device_capability", &pauserec::trie_topk::cuda::device_capability,
        "Compute capability x 10 of the current device (0 without one).");
  m.def("trie_topk", &tt::trie_topk_host, tt::kDoc, arg("scores"), arg("logprobs"), arg("nodes"), arg("offsets"),
        arg("tokens"), arg("children"), arg("k"), arg("node_mask") = py::none(), arg("mask_row") = py::none());

  py::class_<tt::PyDeviceTrie>(m, "DeviceTrie", "A trie resident on the current CUDA device, reused across calls.")
      .def(py::init<const py::handle&, const py::handle&, const py::handle&>(), arg("offsets"), arg("tokens"),
           arg("children"))
      .def_property_readonly("num_nodes", [](const tt::PyDeviceTrie& t) { return t.trie->num_nodes(); })
      .def_property_readonly("num_edges", [](const tt::PyDeviceTrie& t) { return t.trie->num_edges(); })
      .def_property_readonly("device", [](const tt::PyDeviceTrie& t) { return t.trie->device(); })
      .def("topk", &tt::PyDeviceTrie::topk, "Host arrays in and out; same rules and errors as trie_topk.",
           arg("scores"), arg("logprobs"), arg("nodes"), arg("k"), arg("node_mask") = py::none(),
           arg("mask_row") = py::none())
      .def("topk_device", &tt::PyDeviceTrie::topk_device,
           "Device pointers in and out (C-contiguous float32 scores (B, K_in), logprobs (B, K_in, V), int32 nodes\n"
           "(B, K_in); outputs (B, k) int32 parent/token/node and float32 score). Optional filter: node_mask\n"
           "(mask_rows, N) uint8 and mask_row (B,) int32 device buffers. sync=False returns after the launch;\n"
           "call synchronize(stream) before reading the outputs on another stream or the host.",
           arg("scores"), arg("logprobs"), arg("nodes"), arg("batch"), arg("k_in"), arg("vocab"), arg("k"),
           arg("out_parent"), arg("out_token"), arg("out_node"), arg("out_score"), arg("stream") = 0,
           arg("node_mask") = 0, arg("mask_row") = 0, arg("mask_rows") = 0, arg("sync") = true)
      .def("synchronize", &tt::PyDeviceTrie::synchronize, "Wait for `stream`; raise the first failure since the last check.",
           arg("stream") = 0);

  py::class_<tt::DeviceArray>(m, "DeviceArray", "Plain device memory of one dtype and shape (C order).")
      .def(py::init<const std::vector<py::ssize_t>&, const std::string&, bool>(), arg("shape"), arg("dtype"),
           arg("zero") = true)
      .def_static("from_numpy", &tt::from_numpy, arg("array"))
      .def("upload", &tt::DeviceArray::upload, arg("array"))
      .def("to_numpy", &tt::DeviceArray::to_numpy)
      .def_property_readonly("ptr", [](const tt::DeviceArray& a) { return reinterpret_cast<uintptr_t>(a.ptr); })
      .def_property_readonly("shape", [](const tt::DeviceArray& a) { return py::tuple(py::cast(a.shape)); })
      .def_property_readonly("dtype", [](const tt::DeviceArray& a) { return a.dtype.name; })
      .def_property_readonly("nbytes", [](const tt::DeviceArray& a) { return a.nbytes; })
      .def_property_readonly("__cuda_array_interface__", &tt::DeviceArray::interface);

  m.def("copy_slots", &tt::copy_slots, "dst[r, dst_at + s] = src[r, src_at + s] for r < rows, s < n (slots of width bytes).",
        arg("dst"), arg("src"), arg("rows"), arg("dst_slots"), arg("dst_at"), arg("src_slots"), arg("src_at"), arg("n"),
        arg("width"), arg("stream") = 0);
  m.def("gather_beams", &tt::gather_beams,
        "dst[o, b, h, k] = src[o, b, h, max(parent[b, k], 0)] over (outer, batch, heads, beams, inner bytes).",
        arg("dst"), arg("src"), arg("parent"), arg("outer"), arg("batch"), arg("heads"), arg("beams"), arg("inner"),
        arg("stream") = 0);
  m.def("tokens_to_codes", &tt::tokens_to_codes, "dst int64[i] = max(src int32[i], 0).", arg("dst"), arg("src"),
        arg("n"), arg("stream") = 0);
  m.attr("MAX_K") = tt::kMaxK;
}
