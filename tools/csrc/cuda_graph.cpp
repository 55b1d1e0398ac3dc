// CUDA graphs for the training step through libtorch's own `at::cuda::CUDAGraph` (tch has
// no binding): capture on a side stream from libtorch's pool with the caching allocator's
// private graph pool, replay on the current stream. Also the current stream (NCCL must be
// called on it while capturing) and stream-ordered fences (`c10::Event`, dispatched through
// libtorch's device guard, so nothing here links the CUDA runtime directly).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>

#include "guarded.h"

using cx::guarded;

// Makes a pool stream of `device` current (and `device` the current device) until
// destroyed. Done by hand rather than with c10's CUDAStreamGuard, whose inline code would
// link the CUDA runtime into this object.
class StreamScope {
 public:
  explicit StreamScope(c10::DeviceIndex device)
      : prev_device_(c10::cuda::ExchangeDevice(device)),
        prev_stream_(c10::cuda::getCurrentCUDAStream(device)) {
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, device));
  }
  ~StreamScope() {
    c10::cuda::setCurrentCUDAStream(prev_stream_);
    c10::cuda::ExchangeDevice(prev_device_);
  }
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  c10::DeviceIndex prev_device_;
  c10::cuda::CUDAStream prev_stream_;
};

struct cx_graph {
  at::cuda::CUDAGraph graph;
  std::optional<StreamScope> capture_stream;
};

struct cx_side_stream {
  StreamScope scope;
};

struct cx_fence {
  c10::Event event{c10::DeviceType::CUDA};
};

extern "C" {

cx_graph* cx_graph_new() {
  cx_graph* g = nullptr;
  guarded([&] { g = new cx_graph(); });
  return g;
}

void cx_graph_free(cx_graph* g) { delete g; }

// Everything this thread queues on `device` from here to `cx_graph_capture_end` is
// recorded, not run. Other threads are not restricted (thread-local capture mode): the
// loader's threads go on with their own streams.
int cx_graph_capture_begin(cx_graph* g, int device) {
  return guarded([&] {
    c10::cuda::device_synchronize();
    g->capture_stream.emplace(static_cast<c10::DeviceIndex>(device));
    try {
      g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
      g->capture_stream.reset();
      throw;
    }
  });
}

// Ends the capture (also after a failed body, which then reports the capture's error) and
// returns to the previous stream.
int cx_graph_capture_end(cx_graph* g) {
  return guarded([&] {
    try {
      g->graph.capture_end();
    } catch (...) {
      g->capture_stream.reset();
      throw;
    }
    g->capture_stream.reset();
    c10::cuda::device_synchronize();
  });
}

int cx_graph_replay(cx_graph* g) {
  return guarded([&] { g->graph.replay(); });
}

// Makes a stream from libtorch's pool this thread's current one (after the device is idle)
// until `cx_side_stream_exit`: warm-up before a capture, as PyTorch recommends.
cx_side_stream* cx_side_stream_enter(int device) {
  cx_side_stream* s = nullptr;
  guarded([&] {
    c10::cuda::device_synchronize();
    s = new cx_side_stream{StreamScope(static_cast<c10::DeviceIndex>(device))};
  });
  return s;
}

int cx_side_stream_exit(cx_side_stream* s) {
  return guarded([&] {
    c10::cuda::device_synchronize();
    delete s;
  });
}

// libtorch's current stream on `device` (the legacy default stream unless a capture or a
// side stream is under way).
void* cx_current_stream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

// A fence after the work queued so far on the current stream of `device`.
cx_fence* cx_fence_record(int device) {
  cx_fence* f = nullptr;
  guarded([&] {
    auto fence = new cx_fence();
    try {
      fence->event.record(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)));
    } catch (...) {
      delete fence;
      throw;
    }
    f = fence;
  });
  return f;
}

int cx_fence_wait(cx_fence* f) {
  return guarded([&] { f->event.synchronize(); });
}

void cx_fence_free(cx_fence* f) { delete f; }
}
