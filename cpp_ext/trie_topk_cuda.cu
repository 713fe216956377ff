// CUDA trie-masked top-k: host side (device checks, the resident trie, launches). The kernels and
// the algorithm are in trie_topk_kernels.cuh.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "trie_topk.h"
#include "trie_topk_kernels.cuh"

#ifndef PAUSEREC_CUDA_SASS
#define PAUSEREC_CUDA_SASS ""
#endif
#ifndef PAUSEREC_CUDA_PTX
#define PAUSEREC_CUDA_PTX ""
#endif

namespace pauserec {
namespace trie_topk {
namespace {

using namespace kernels;

// ---- host helpers ----

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
    case kTooManyCandidates:
      return "a row's beams reference 2**32 or more trie edges: the CUDA kernel cannot number them; use impl='cpu'";
    default: return "invalid trie-masked top-k input";
  }
}

int64_t pow2_at_least_host(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

size_t aligned(size_t n) { return (n + 255) / 256 * 256; }

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + 255) / 256;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

cuda::Result finish(const char* what, cudaStream_t stream) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return failure(what, e);
  e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return failure(what, e);
  return cuda::Result{};
}

// Parses "75,80,86" into capabilities; true when `cc` can run code built for one of them.
bool covered(const char* list, int cc, bool ptx) {
  const std::string s(list);
  size_t at = 0;
  while (at < s.size()) {
    size_t end = s.find(',', at);
    if (end == std::string::npos) end = s.size();
    const int built = std::atoi(s.substr(at, end - at).c_str());
    if (built > 0) {
      if (ptx && built <= cc) return true;                             // PTX: JIT for any newer GPU
      if (!ptx && built / 10 == cc / 10 && built % 10 <= cc % 10) return true;  // SASS: same major
    }
    at = end + 1;
  }
  return false;
}

struct Probe {
  bool ok = false;
  std::string why;
  int cc = 0;
};

Probe probe_device() {
  Probe r;
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    r.why = "no usable CUDA device (" + std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e) + ")";
    if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice)
      r.why += "; this module needs an NVIDIA GPU with a driver for CUDA " + std::to_string(CUDART_VERSION / 1000) +
               "." + std::to_string(CUDART_VERSION % 1000 / 10) + " or newer";
    return r;
  }
  if (count == 0) {
    r.why = "no CUDA device found";
    return r;
  }
  int dev = 0;
  cudaDeviceProp prop{};
  if ((e = cudaGetDevice(&dev)) != cudaSuccess || (e = cudaGetDeviceProperties(&prop, dev)) != cudaSuccess) {
    r.why = describe("cudaGetDeviceProperties", e);
    cudaGetLastError();
    return r;
  }
  r.cc = prop.major * 10 + prop.minor;
  const std::string sass = PAUSEREC_CUDA_SASS, ptx = PAUSEREC_CUDA_PTX;
  const std::string gpu = std::string(prop.name) + ", compute capability " + std::to_string(prop.major) + "." +
                          std::to_string(prop.minor);
  const std::string rebuild = "rebuild pauserec for it: PAUSEREC_CUDA_ARCHS=" + std::to_string(r.cc) +
                              " pip install --force-reinstall --no-deps <pauserec source> (or use impl='cpu')";
  if ((!sass.empty() || !ptx.empty()) && !covered(sass.c_str(), r.cc, false) && !covered(ptx.c_str(), r.cc, true)) {
    r.why = "this GPU (" + gpu + ") has no code in this build (SASS for " + (sass.empty() ? "none" : sass) +
            ", PTX for " + (ptx.empty() ? "none" : ptx) + "); " + rebuild;
    return r;
  }
  int32_t* d = nullptr;
  int32_t h = 0;
  e = cudaMalloc(reinterpret_cast<void**>(&d), sizeof(int32_t));
  if (e == cudaSuccess) {
    probe_kernel<<<1, 1>>>(d);
    e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaMemcpy(&h, d, sizeof(int32_t), cudaMemcpyDeviceToHost);
    cudaFree(d);
  }
  if (e != cudaSuccess || h != 42) {
    r.why = "a test launch on this GPU (" + gpu + ") failed" +
            (e != cudaSuccess ? " (" + std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e) + ")" : "") +
            "; " + rebuild;
    cudaGetLastError();
    return r;
  }
  r.ok = true;
  return r;
}

const Probe& probe() {
  static const Probe result = probe_device();  // once per process (thread-safe static init)
  return result;
}

}  // namespace

namespace cuda {

const char* built_sass() { return PAUSEREC_CUDA_SASS; }
const char* built_ptx() { return PAUSEREC_CUDA_PTX; }

bool device_usable(std::string* why) {
  const Probe& r = probe();
  if (!r.ok && why) *why = r.why;
  return r.ok;
}

int device_capability() { return probe().cc; }

Result DeviceTrie::create(const TrieView& host, std::unique_ptr<DeviceTrie>* out) {
  std::string why;
  if (!device_usable(&why)) return Result{kRuntimeFailure, why};
  std::unique_ptr<DeviceTrie> t(new DeviceTrie());
  const size_t n_off = static_cast<size_t>(host.num_nodes + 1), n_edge = static_cast<size_t>(host.num_edges);
  t->host_storage_.resize(n_off + 2 * n_edge);
  int32_t* h = t->host_storage_.data();
  std::memcpy(h, host.offsets, n_off * sizeof(int32_t));
  if (n_edge) {
    std::memcpy(h + n_off, host.tokens, n_edge * sizeof(int32_t));
    std::memcpy(h + n_off + n_edge, host.children, n_edge * sizeof(int32_t));
  }
  t->host_ = TrieView{h, h + n_off, h + n_off + n_edge, host.num_nodes, host.num_edges};
  cudaError_t e = cudaGetDevice(&t->device_);
  if (e != cudaSuccess) return failure("cudaGetDevice", e);
  const size_t bytes = t->host_storage_.size() * sizeof(int32_t);
  if ((e = cudaMalloc(reinterpret_cast<void**>(&t->d_trie_), bytes)) != cudaSuccess) return failure("cudaMalloc (trie)", e);
  if ((e = cudaMemcpy(t->d_trie_, h, bytes, cudaMemcpyHostToDevice)) != cudaSuccess) return failure("cudaMemcpy (trie)", e);
  if ((e = cudaMalloc(reinterpret_cast<void**>(&t->d_status_), sizeof(int32_t))) != cudaSuccess)
    return failure("cudaMalloc (status)", e);
  if ((e = cudaMemset(t->d_status_, 0, sizeof(int32_t))) != cudaSuccess) return failure("cudaMemset (status)", e);
  if ((e = cudaDeviceSynchronize()) != cudaSuccess) return failure("cudaDeviceSynchronize (trie upload)", e);
  *out = std::move(t);
  return Result{};
}

DeviceTrie::~DeviceTrie() {
  // cudaFree fails harmlessly once the CUDA runtime is torn down at interpreter exit
  if (d_trie_) cudaFree(d_trie_);
  if (d_work_) cudaFree(d_work_);
  if (d_status_) cudaFree(d_status_);
  cudaGetLastError();
}

Result DeviceTrie::reserve(const Problem& p) {
  const size_t keys = p.k > kSharedKeys ? static_cast<size_t>(p.batch * pow2_at_least_host(p.k)) * sizeof(uint64_t) : 0;
  const size_t need = aligned(static_cast<size_t>(p.batch * p.k_in) * sizeof(uint32_t)) + keys;
  if (need <= work_bytes_) return Result{};
  if (d_work_) {
    cudaFree(d_work_);  // synchronises the device: no call still uses it
    d_work_ = nullptr;
    work_bytes_ = 0;
  }
  const cudaError_t e = cudaMalloc(&d_work_, need);
  if (e != cudaSuccess) return failure("cudaMalloc (workspace)", e);
  work_bytes_ = need;
  return Result{};
}

Result DeviceTrie::run_device(Problem p, uintptr_t stream_handle, bool sync) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (p.batch == 0) return Result{};
    if (p.batch > INT_MAX)
      return Result{kInvalidInput, "batch size " + std::to_string(p.batch) + " exceeds the CUDA grid limit"};
    cudaError_t e = cudaSetDevice(device_);
    if (e != cudaSuccess) return failure("cudaSetDevice", e);
    Result r = reserve(p);
    if (r.kind != kDone) return r;
    const size_t n_off = static_cast<size_t>(host_.num_nodes + 1), n_edge = static_cast<size_t>(host_.num_edges);
    p.trie = TrieView{d_trie_, d_trie_ + n_off, d_trie_ + n_off + n_edge, host_.num_nodes, host_.num_edges};
    char* work = static_cast<char*>(d_work_);
    const size_t base_bytes = aligned(static_cast<size_t>(p.batch * p.k_in) * sizeof(uint32_t));
    Workspace ws{reinterpret_cast<uint32_t*>(work), reinterpret_cast<uint64_t*>(work + base_bytes),
                 p.k > kSharedKeys ? pow2_at_least_host(p.k) : 0, d_status_};
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
    trie_topk_kernel<<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p, ws);
    e = cudaGetLastError();
    if (e != cudaSuccess) return failure("trie_topk_kernel launch", e);
  }
  return sync ? synchronize(stream_handle) : Result{};
}

Result DeviceTrie::synchronize(uintptr_t stream_handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int32_t status = 0;
  cudaError_t e = cudaSetDevice(device_);
  if (e != cudaSuccess) return failure("cudaSetDevice", e);
  e = cudaMemcpyAsync(&status, d_status_, sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
  if (e != cudaSuccess) return failure("cudaMemcpyAsync (status)", e);
  e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return failure("trie_topk_kernel", e);
  if (status == kOk) return Result{};
  cudaMemsetAsync(d_status_, 0, sizeof(int32_t), stream);
  cudaStreamSynchronize(stream);
  return Result{kInvalidInput, status_message(status)};
}

Result DeviceTrie::run_host(const Problem& hp) {
  Problem checked = hp;
  checked.trie = host_;
  const ErrorInfo err = validate_all(checked);
  if (err.status != kOk) return Result{kInvalidInput, error_message(err, checked)};
  if (hp.batch == 0) return Result{};
  const bool masked = hp.mask_row != nullptr && hp.node_mask != nullptr;
  const size_t bk = static_cast<size_t>(hp.batch * hp.k_in), out = static_cast<size_t>(hp.batch * hp.k);
  const size_t n_mask = masked ? static_cast<size_t>(hp.mask_rows * host_.num_nodes) : 0;
  const size_t n_rows = masked ? static_cast<size_t>(hp.batch) : 0;
  constexpr int kSlots = 9;  // scores, logprobs, nodes, node_mask, mask_row, 4 outputs
  const size_t sizes[kSlots] = {bk * 4, bk * static_cast<size_t>(hp.vocab) * 4, bk * 4, n_mask, n_rows * 4,
                                out * 4, out * 4, out * 4, out * 4};
  size_t total = 0;
  for (size_t s : sizes) total += aligned(s);
  cudaError_t e = cudaSetDevice(device_);
  if (e != cudaSuccess) return failure("cudaSetDevice", e);
  char* base = nullptr;
  if ((e = cudaMalloc(reinterpret_cast<void**>(&base), total)) != cudaSuccess) return failure("cudaMalloc (inputs)", e);
  struct Free {
    char* p;
    ~Free() { cudaFree(p); }
  } guard{base};
  void* slot[kSlots];
  size_t at = 0;
  for (int i = 0; i < kSlots; ++i) {
    slot[i] = base + at;
    at += aligned(sizes[i]);
  }
  const void* src[5] = {hp.scores, hp.logprobs, hp.nodes, hp.node_mask, hp.mask_row};
  for (int i = 0; i < 5; ++i) {
    if (sizes[i] == 0) continue;
    if ((e = cudaMemcpy(slot[i], src[i], sizes[i], cudaMemcpyHostToDevice)) != cudaSuccess)
      return failure("cudaMemcpy (inputs)", e);
  }
  Problem dp = hp;
  dp.scores = static_cast<const float*>(slot[0]);
  dp.logprobs = static_cast<const float*>(slot[1]);
  dp.nodes = static_cast<const int32_t*>(slot[2]);
  dp.node_mask = masked ? static_cast<const uint8_t*>(slot[3]) : nullptr;
  dp.mask_row = masked ? static_cast<const int32_t*>(slot[4]) : nullptr;
  dp.out_parent = static_cast<int32_t*>(slot[5]);
  dp.out_token = static_cast<int32_t*>(slot[6]);
  dp.out_node = static_cast<int32_t*>(slot[7]);
  dp.out_score = static_cast<float*>(slot[8]);
  Result r = run_device(dp, 0, true);
  if (r.kind != kDone) return r;
  void* dst[4] = {hp.out_parent, hp.out_token, hp.out_node, hp.out_score};
  for (int i = 0; i < 4; ++i) {
    if ((e = cudaMemcpy(dst[i], slot[5 + i], sizes[5 + i], cudaMemcpyDeviceToHost)) != cudaSuccess)
      return failure("cudaMemcpy (outputs)", e);
  }
  return Result{};
}

Result copy_slots(void* dst, const void* src, int64_t rows, int64_t dst_slots, int64_t dst_at, int64_t src_slots,
                  int64_t src_at, int64_t n, int64_t width, uintptr_t stream_handle) {
  if (rows < 0 || n < 0 || width < 0 || dst_at < 0 || src_at < 0 || dst_at + n > dst_slots || src_at + n > src_slots)
    return Result{kInvalidInput, "copy_slots: slot range outside the tensors"};
  if (rows == 0 || n == 0 || width == 0) return Result{};
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                          static_cast<uintptr_t>(width);
  if (align % 16 == 0) {
    const int64_t words = width / 16;
    copy_slots_kernel<<<grid_for(rows * n * words), 256, 0, stream>>>(
        static_cast<uint4*>(dst), static_cast<const uint4*>(src), rows, dst_slots, dst_at, src_slots, src_at, n, words);
  } else if (align % 4 == 0) {
    const int64_t words = width / 4;
    copy_slots_kernel<<<grid_for(rows * n * words), 256, 0, stream>>>(
        static_cast<uint32_t*>(dst), static_cast<const uint32_t*>(src), rows, dst_slots, dst_at, src_slots, src_at, n,
        words);
  } else {
    copy_slots_kernel<<<grid_for(rows * n * width), 256, 0, stream>>>(
        static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), rows, dst_slots, dst_at, src_slots, src_at, n,
        width);
  }
  return finish("copy_slots_kernel", stream);
}

Result gather_beams(void* dst, const void* src, const int32_t* parent, int64_t outer, int64_t batch, int64_t heads,
                    int64_t beams, int64_t inner, uintptr_t stream_handle) {
  if (outer < 0 || batch < 0 || heads < 0 || beams < 0 || inner < 0)
    return Result{kInvalidInput, "gather_beams: negative dimension"};
  const int64_t rows = outer * batch * heads * beams;
  if (rows == 0 || inner == 0) return Result{};
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                          static_cast<uintptr_t>(inner);
  if (align % 16 == 0) {
    gather_beams_kernel<<<grid_for(rows * (inner / 16)), 256, 0, stream>>>(
        static_cast<uint4*>(dst), static_cast<const uint4*>(src), parent, outer, batch, heads, beams, inner / 16);
  } else if (align % 4 == 0) {
    gather_beams_kernel<<<grid_for(rows * (inner / 4)), 256, 0, stream>>>(
        static_cast<uint32_t*>(dst), static_cast<const uint32_t*>(src), parent, outer, batch, heads, beams, inner / 4);
  } else {
    gather_beams_kernel<<<grid_for(rows * inner), 256, 0, stream>>>(
        static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), parent, outer, batch, heads, beams, inner);
  }
  return finish("gather_beams_kernel", stream);
}

Result tokens_to_codes(int64_t* dst, const int32_t* src, int64_t n, uintptr_t stream_handle) {
  if (n <= 0) return Result{};
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  tokens_to_codes_kernel<<<grid_for(n), 256, 0, stream>>>(dst, src, n);
  return finish("tokens_to_codes_kernel", stream);
}

Result allocate(size_t bytes, void** out) {
  *out = nullptr;
  if (bytes == 0) return Result{};
  const cudaError_t e = cudaMalloc(out, bytes);
  if (e != cudaSuccess) return failure("cudaMalloc", e);
  return Result{};
}

void release(void* ptr) {
  if (ptr) cudaFree(ptr);
  cudaGetLastError();
}

Result copy(void* dst, const void* src, size_t bytes, int kind) {
  if (bytes == 0) return Result{};
  cudaError_t e = cudaMemcpy(dst, src, bytes, static_cast<cudaMemcpyKind>(kind));
  if (e != cudaSuccess) return failure("cudaMemcpy", e);
  // A copy from pageable memory may return before its DMA lands, and other libraries (ONNX Runtime,
  // TensorRT) read on streams of their own: finish it before anyone else can see the buffer.
  e = cudaStreamSynchronize(0);
  if (e != cudaSuccess) return failure("cudaStreamSynchronize (copy)", e);
  return Result{};
}

Result zero(void* dst, size_t bytes) {
  if (bytes == 0) return Result{};
  cudaError_t e = cudaMemset(dst, 0, bytes);
  if (e == cudaSuccess) e = cudaStreamSynchronize(0);  // cudaMemset is asynchronous to the host
  if (e != cudaSuccess) return failure("cudaMemset", e);
  return Result{};
}

}  // namespace cuda
}  // namespace trie_topk
}  // namespace pauserec
