// For building Jittor's jittor/vcompiler/vcompiler.cc on a machine without CUDA (see ../replay.py). That file
// includes cuda_runtime.h and cuda_fp16.h unconditionally, and its delay_fetch (which jdiff never calls) uses a
// few CUDA runtime functions outside `#ifdef HAS_CUDA`. Here they are declared and fail (return an error) if
// ever called; everything else in the file is guarded by HAS_CUDA.
#pragma once
typedef void* cudaEvent_t;
typedef int cudaError_t;
enum { cudaEventDisableTiming = 2 };
enum cudaMemcpyKind { cudaMemcpyDeviceToHost = 2 };
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t*, unsigned) { return 1; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return 1; }
inline cudaError_t cudaEventRecord(cudaEvent_t, int) { return 1; }
inline cudaError_t cudaMemcpyAsync(void*, const void*, unsigned long, cudaMemcpyKind, int) { return 1; }
#define checkCudaErrors(call) (call)
