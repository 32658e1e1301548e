// The scheduler of the CUDA emulation (include/fs_cuda_emu/runtime.h): fibers, barriers, warp collectives,
// launches, the runtime API's error state.
#include "fs_cuda_emu/runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fs_emu {
namespace detail {
const ThreadPlace* current_place = nullptr;
}  // namespace detail

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

// ---- context switching -------------------------------------------------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE / x87 control words on the current stack, stores the stack
// pointer in *from, loads `to` and restores what it saved. A new fiber's stack is laid out as if it had
// been switched away from just before entering fs_emu_start.
extern "C" void fs_emu_switch(void** from, void* to);
extern "C" void fs_emu_start();
asm(R"(
  .pushsection .text
  .globl fs_emu_switch
  .hidden fs_emu_switch
  .type fs_emu_switch, @function
fs_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fs_emu_switch, .-fs_emu_switch

  .globl fs_emu_start
  .hidden fs_emu_start
  .type fs_emu_start, @function
fs_emu_start:
  call fs_emu_fiber_main
  ud2
  .size fs_emu_start, .-fs_emu_start
  .popsection
)");
#endif

enum class State { kRunnable, kAtBarrier, kAtWarp, kExited };

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  State state = State::kRunnable;
  ThreadPlace place{};
  Site site{};
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  uint64_t bits = 0;
  int lane_arg = 0;
  int width = 32;
  uint64_t result = 0;
};

struct Launch {
  std::vector<Fiber> fibers;
  int threads = 0;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  bool failed = false;
  std::string error;
};

Launch* g_launch = nullptr;
uint64_t g_epoch = 0;
uint64_t g_launches = 0;
std::mutex g_mutex;  // one launch at a time: shared memory is static storage

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

char* g_stacks = nullptr;  // kMaxThreads stacks, each above a guard page

size_t page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

char* stack_top(int index) {
  if (g_stacks == nullptr) {
    const size_t each = kStackBytes + page_bytes();
    void* region = mmap(nullptr, each * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                        -1, 0);
    if (region == MAP_FAILED) {
      std::fprintf(stderr, "fs_emu: cannot map fiber stacks\n");
      std::abort();
    }
    g_stacks = static_cast<char*>(region);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(g_stacks + i * each, page_bytes(), PROT_NONE);
  }
  return g_stacks + (static_cast<size_t>(index) + 1) * (kStackBytes + page_bytes());
}

void set_error(cudaError_t code, std::string message) {
  t_last_error = code;
  t_last_message = std::move(message);
}

std::string describe(const Fiber& fiber) {
  std::ostringstream out;
  const ThreadPlace& p = fiber.place;
  out << "block (" << p.block_idx.x << ", " << p.block_idx.y << ", " << p.block_idx.z << ") thread ("
      << p.thread_idx.x << ", " << p.thread_idx.y << ", " << p.thread_idx.z << ")";
  return out.str();
}

std::string where(Site site) {
  std::string file = site.file_name();
  const size_t slash = file.find_last_of('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return file + ":" + std::to_string(site.line());
}

const char* op_name(WarpOp op) {
  static const char* const kNames[] = {"__syncwarp",      "__shfl_sync",     "__shfl_up_sync", "__shfl_down_sync",
                                       "__shfl_xor_sync", "__ballot_sync",   "__any_sync",     "__all_sync"};
  return kNames[static_cast<int>(op)];
}

// ---- fibers ------------------------------------------------------------------------------------------------

void to_scheduler() {
  Launch& launch = *g_launch;
#if defined(__x86_64__)
  fs_emu_switch(&launch.current->sp, launch.scheduler_sp);
#else
  swapcontext(&launch.current->context, &launch.scheduler);
#endif
}

void resume(Fiber& fiber) {
  Launch& launch = *g_launch;
  launch.current = &fiber;
  detail::current_place = &fiber.place;
#if defined(__x86_64__)
  fs_emu_switch(&launch.scheduler_sp, fiber.sp);
#else
  swapcontext(&launch.scheduler, &fiber.context);
#endif
  launch.current = nullptr;
  detail::current_place = nullptr;
}

Fiber& running(const char* what, Site site) {
  if (g_launch == nullptr || g_launch->current == nullptr) {
    std::fprintf(stderr, "fs_emu: %s called outside a kernel at %s\n", what, where(site).c_str());
    std::abort();
  }
  return *g_launch->current;
}

}  // namespace

extern "C" __attribute__((visibility("hidden"))) void fs_emu_fiber_main() {
  Launch& launch = *g_launch;
  launch.body(launch.context);
  launch.current->state = State::kExited;
  to_scheduler();
  __builtin_trap();  // an exited fiber is never resumed
}

namespace {

void prepare(Fiber& fiber, int index) {
  fiber.state = State::kRunnable;
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(stack_top(index));  // 16-byte aligned
  uint64_t* sp = top - 8;
  sp[7] = reinterpret_cast<uint64_t>(&fs_emu_start);  // the return address fs_emu_switch pops
  for (int i = 1; i < 7; ++i) sp[i] = 0;             // r15, r14, r13, r12, rbx, rbp
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpu_control, 2);
  fiber.sp = sp;
#else
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack_top(index) - kStackBytes;
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = nullptr;
  makecontext(&fiber.context, reinterpret_cast<void (*)()>(&fs_emu_fiber_main), 0);
#endif
}

// A small, seeded generator for the scheduling order.
struct Mixer {
  uint64_t state;
  uint64_t next() {
    state += 0x9E3779B97F4A7C15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

enum class Order { kShuffle, kForward, kReverse };

Order order_from_environment() {
  const char* value = std::getenv("FASTSEARCH_CUDA_EMU_ORDER");
  if (value == nullptr || std::string(value) == "shuffle") return Order::kShuffle;
  if (std::string(value) == "forward") return Order::kForward;
  if (std::string(value) == "reverse") return Order::kReverse;
  std::fprintf(stderr, "fs_emu: FASTSEARCH_CUDA_EMU_ORDER must be shuffle, forward or reverse, got %s\n", value);
  std::abort();
}

uint64_t seed_from_environment() {
  const char* value = std::getenv("FASTSEARCH_CUDA_EMU_SEED");
  return value == nullptr ? 0 : std::strtoull(value, nullptr, 10);
}

void fail_launch(Launch& launch, std::string message) {
  if (!launch.failed) {
    launch.failed = true;
    launch.error = std::move(message);
  }
}

// Completes the warp collectives whose lanes have all arrived. Returns whether any lane was released.
bool settle_warps(Launch& launch) {
  bool released = false;
  const int warps = (launch.threads + 31) / 32;
  for (int warp = 0; warp < warps && !launch.failed; ++warp) {
    const int first = warp * 32;
    const int lanes = std::min(32, launch.threads - first);
    for (int lane = 0; lane < lanes && !launch.failed; ++lane) {
      Fiber& leader = launch.fibers[first + lane];
      if (leader.state != State::kAtWarp) continue;
      const unsigned mask = leader.mask;
      bool ready = true;
      for (int other = 0; other < 32 && !launch.failed; ++other) {
        if (!(mask >> other & 1u)) continue;
        if (other >= lanes) {
          fail_launch(launch, std::string(op_name(leader.op)) + " at " + where(leader.site) + " by " +
                                  describe(leader) + ": mask names lane " + std::to_string(other) +
                                  ", which this block of " + std::to_string(launch.threads) + " threads lacks");
          break;
        }
        const Fiber& peer = launch.fibers[first + other];
        if (peer.state == State::kExited) {
          fail_launch(launch, std::string(op_name(leader.op)) + " at " + where(leader.site) + " by " +
                                  describe(leader) + ": mask names lane " + std::to_string(other) +
                                  ", which has exited");
        } else if (peer.state != State::kAtWarp) {
          ready = false;  // still running, or at __syncthreads (a deadlock the block check reports)
        } else if (peer.mask != mask || peer.op != leader.op || peer.width != leader.width) {
          fail_launch(launch, std::string("warp collectives disagree: ") + describe(leader) + " at " +
                                  op_name(leader.op) + " (" + where(leader.site) + ", mask " +
                                  std::to_string(mask) + ") and lane " + std::to_string(other) + " at " +
                                  op_name(peer.op) + " (" + where(peer.site) + ", mask " +
                                  std::to_string(peer.mask) + ")");
        }
      }
      if (!ready || launch.failed) continue;
      unsigned votes = 0;
      for (int other = 0; other < 32; ++other) {
        if ((mask >> other & 1u) && launch.fibers[first + other].bits != 0) votes |= 1u << other;
      }
      for (int member = 0; member < 32 && !launch.failed; ++member) {
        if (!(mask >> member & 1u)) continue;
        Fiber& f = launch.fibers[first + member];
        const int width = f.width;
        const int segment = member & ~(width - 1);
        int source = member;
        switch (f.op) {
          case WarpOp::kShflIdx:
            source = segment + (f.lane_arg & (width - 1));
            break;
          case WarpOp::kShflUp:
            source = member - f.lane_arg >= segment ? member - f.lane_arg : member;
            break;
          case WarpOp::kShflDown:
            source = member + f.lane_arg < segment + width ? member + f.lane_arg : member;
            break;
          case WarpOp::kShflXor:
            source = (member ^ f.lane_arg) < segment + width ? member ^ f.lane_arg : member;
            break;
          default:
            break;
        }
        if (source < 0 || source >= 32 || !(mask >> source & 1u)) {
          fail_launch(launch, std::string(op_name(f.op)) + " at " + where(f.site) + " by " + describe(f) +
                                  " reads lane " + std::to_string(source) + ", which is not in the mask");
          break;
        }
        switch (f.op) {
          case WarpOp::kSync:
            f.result = 0;
            break;
          case WarpOp::kBallot:
            f.result = votes;
            break;
          case WarpOp::kAny:
            f.result = votes != 0;
            break;
          case WarpOp::kAll:
            f.result = votes == mask;
            break;
          default:
            f.result = launch.fibers[first + source].bits;
            break;
        }
      }
      if (launch.failed) break;
      for (int member = 0; member < 32; ++member) {
        if (mask >> member & 1u) launch.fibers[first + member].state = State::kRunnable;
      }
      released = true;
    }
  }
  return released;
}

// Releases __syncthreads once every thread waits there, from one call site. Returns whether it did.
bool settle_block(Launch& launch) {
  int waiting = 0;
  int exited = 0;
  const Fiber* first_waiting = nullptr;
  const Fiber* first_exited = nullptr;
  const Fiber* at_warp = nullptr;
  for (const Fiber& f : launch.fibers) {
    if (f.state == State::kAtBarrier) {
      ++waiting;
      if (first_waiting == nullptr) first_waiting = &f;
    } else if (f.state == State::kExited) {
      ++exited;
      if (first_exited == nullptr) first_exited = &f;
    } else if (f.state == State::kAtWarp && at_warp == nullptr) {
      at_warp = &f;
    }
  }
  if (waiting == 0 && at_warp == nullptr) return false;  // all exited: the block is done
  if (at_warp != nullptr) {
    std::string message = "deadlock: " + describe(*at_warp) + " waits at " + op_name(at_warp->op) + " (" +
                          where(at_warp->site) + ")";
    if (first_waiting != nullptr) {
      message += " while " + describe(*first_waiting) + " waits at __syncthreads (" + where(first_waiting->site) + ")";
    } else if (first_exited != nullptr) {
      message += " for lanes that exited";
    }
    fail_launch(launch, message);
    return false;
  }
  if (exited > 0) {
    fail_launch(launch, "__syncthreads at " + where(first_waiting->site) + " reached by " + std::to_string(waiting) +
                            " of " + std::to_string(launch.threads) + " threads: " + describe(*first_exited) +
                            " had exited");
    return false;
  }
  for (const Fiber& f : launch.fibers) {
    if (f.site.line() != first_waiting->site.line() ||
        std::strcmp(f.site.file_name(), first_waiting->site.file_name()) != 0) {
      fail_launch(launch, "divergent __syncthreads: " + describe(*first_waiting) + " at " +
                              where(first_waiting->site) + ", " + describe(f) + " at " + where(f.site));
      return false;
    }
  }
  for (Fiber& f : launch.fibers) f.state = State::kRunnable;
  return true;
}

void run_block(Launch& launch, Mixer& mixer, Order order) {
  std::vector<int> sequence(launch.threads);
  for (int i = 0; i < launch.threads; ++i) sequence[i] = order == Order::kReverse ? launch.threads - 1 - i : i;
  while (!launch.failed) {
    if (order == Order::kShuffle) {
      for (int i = launch.threads - 1; i > 0; --i) std::swap(sequence[i], sequence[mixer.next() % (i + 1)]);
    }
    bool ran = false;
    for (int index : sequence) {
      Fiber& fiber = launch.fibers[index];
      if (fiber.state != State::kRunnable) continue;
      resume(fiber);
      ran = true;
      if (launch.failed) return;
    }
    if (ran) continue;  // threads that yielded at an atomic or fence run again
    if (settle_warps(launch) || launch.failed) continue;
    if (!settle_block(launch)) return;
  }
}

}  // namespace

bool run_grid(const LaunchConfig& config, void (*body)(void*), void* context) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  const uint64_t threads = static_cast<uint64_t>(config.block.x) * config.block.y * config.block.z;
  const uint64_t blocks = static_cast<uint64_t>(config.grid.x) * config.grid.y * config.grid.z;
  if (threads == 0 || threads > kMaxThreads || blocks == 0 || config.grid.x > 2147483647u ||
      config.grid.y > 65535u || config.grid.z > 65535u || config.block.z > 64u) {
    set_error(cudaErrorInvalidValue, "invalid launch configuration: grid (" + std::to_string(config.grid.x) + ", " +
                                         std::to_string(config.grid.y) + ", " + std::to_string(config.grid.z) +
                                         "), block (" + std::to_string(config.block.x) + ", " +
                                         std::to_string(config.block.y) + ", " + std::to_string(config.block.z) + ")");
    return false;
  }
  if (config.shared_bytes != 0) {
    set_error(cudaErrorInvalidValue, "the CUDA emulation has no dynamic shared memory");
    return false;
  }
  Launch launch;
  launch.threads = static_cast<int>(threads);
  launch.fibers.resize(threads);
  launch.body = body;
  launch.context = context;
  Launch* outer = g_launch;
  g_launch = &launch;
  const Order order = order_from_environment();
  Mixer mixer{seed_from_environment() * 0x100000001B3ull + ++g_launches};
  // Blocks in the order i -> (a i + b) mod n, a odd and coprime to n: a permutation that needs no memory.
  uint64_t stride = 1;
  uint64_t start = 0;
  if (order == Order::kShuffle && blocks > 1) {
    start = mixer.next() % blocks;
    for (stride = (mixer.next() % blocks) | 1; std::gcd(stride, blocks) != 1; stride += 2) {
    }
    stride %= blocks;
    if (stride == 0) stride = 1;
  }
  for (uint64_t i = 0; i < blocks && !launch.failed; ++i) {
    uint64_t b = order == Order::kReverse ? blocks - 1 - i : i;
    if (order == Order::kShuffle) {
      b = static_cast<uint64_t>((static_cast<unsigned __int128>(i) * stride + start) % blocks);
    }
    const uint3 block_idx{static_cast<unsigned>(b % config.grid.x),
                          static_cast<unsigned>(b / config.grid.x % config.grid.y),
                          static_cast<unsigned>(b / config.grid.x / config.grid.y)};
    ++g_epoch;
    for (int t = 0; t < launch.threads; ++t) {
      Fiber& f = launch.fibers[t];
      f.place.thread_idx = uint3{static_cast<unsigned>(t % config.block.x),
                                 static_cast<unsigned>(t / config.block.x % config.block.y),
                                 static_cast<unsigned>(t / config.block.x / config.block.y)};
      f.place.block_idx = block_idx;
      f.place.block_dim = config.block;
      f.place.grid_dim = config.grid;
      f.place.linear = t;
      f.site = Site{};
      prepare(f, t);
    }
    run_block(launch, mixer, order);
  }
  g_launch = outer;
  if (launch.failed) {
    set_error(cudaErrorLaunchFailure, "CUDA emulation: " + launch.error);
    return false;
  }
  return true;
}

void block_barrier(Site site) {
  Fiber& fiber = running("__syncthreads", site);
  fiber.state = State::kAtBarrier;
  fiber.site = site;
  to_scheduler();
}

void yield_point() {
  if (g_launch == nullptr || g_launch->current == nullptr) return;  // host code
  to_scheduler();
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int lane_arg, int width, Site site) {
  Fiber& fiber = running(op_name(op), site);
  const int lane = fiber.place.linear % 32;
  if (!(mask >> lane & 1u)) {
    fail(("mask of " + std::string(op_name(op)) + " leaves out the calling lane " + std::to_string(lane)).c_str(),
         site);
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("width must be a power of 2 up to 32", site);
  fiber.state = State::kAtWarp;
  fiber.op = op;
  fiber.mask = mask;
  fiber.bits = bits;
  fiber.lane_arg = lane_arg;
  fiber.width = width;
  fiber.site = site;
  to_scheduler();
  return fiber.result;
}

void fail(const char* what, Site site) {
  Fiber& fiber = running("a check", site);
  fail_launch(*g_launch, std::string(what) + " at " + where(site) + " by " + describe(fiber));
  to_scheduler();
  __builtin_trap();
}

uint64_t block_epoch() { return g_epoch; }

}  // namespace fs_emu

// ---- runtime API ---------------------------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  const cudaError_t error = fs_emu::t_last_error;
  fs_emu::t_last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError() { return fs_emu::t_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  if (error == cudaSuccess) return "no error";
  return fs_emu::t_last_message.c_str();
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// FASTSEARCH_CUDA_EMU_SMS (default 3) multiprocessors: few, so that grid-stride loops take several rounds.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) {
    fs_emu::set_error(cudaErrorInvalidValue, "no such device");
    return cudaErrorInvalidValue;
  }
  if (attribute == cudaDevAttrMultiProcessorCount) {
    const char* sms = std::getenv("FASTSEARCH_CUDA_EMU_SMS");
    *value = sms == nullptr ? 3 : std::atoi(sms);
  } else {
    *value = 1024;
  }
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t) {
  if (pointer == nullptr && bytes > 0) {
    fs_emu::set_error(cudaErrorInvalidValue, "cudaMemsetAsync on a null pointer");
    return cudaErrorInvalidValue;
  }
  if (bytes > 0) std::memset(pointer, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, int, cudaStream_t) {
  if (bytes > 0) std::memmove(to, from, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
