// The fiber scheduler behind mtlfast_cuda_emulation.h. One OS thread runs a block's threads as ucontext fibers;
// a fiber gives control back only while it waits at a collective (a barrier or a warp exchange), so a block runs
// until every fiber has finished, or until none can move (a barrier some threads never reach), which fails the
// launch with a message naming the barrier instead of hanging.
#include "mtlfast_cuda_emulation.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace mtlfast {
namespace emulation {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr std::size_t kStackBytes = 256 * 1024;  // reserved, not committed: pages are touched as used

// Switching fibers. On x86-64 a hand-written switch of the callee-saved registers (glibc's swapcontext also
// saves the signal mask: a system call per switch, which made the emulation ~10x slower); ucontext elsewhere.
#if defined(__x86_64__)
extern "C" void mtlfast_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl mtlfast_emulation_switch
  .hidden mtlfast_emulation_switch
  .type mtlfast_emulation_switch, @function
mtlfast_emulation_switch:
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
  .size mtlfast_emulation_switch, .-mtlfast_emulation_switch
)");

struct Context {
  void* sp = nullptr;
};

// A fresh stack that "returns" into entry() on the first switch to it: the frame mtlfast_emulation_switch pops
// (MXCSR / x87 control word, six callee-saved registers, return address), with the return address 16-byte
// aligned so that entry() starts with the stack alignment of a called function.
void prepare_context(Context& context, unsigned char* stack, std::size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<std::uintptr_t*>((reinterpret_cast<std::uintptr_t>(stack + bytes) & ~std::uintptr_t(15)));
  std::uintptr_t* return_slot = top - 2;
  return_slot[1] = 0;
  return_slot[0] = reinterpret_cast<std::uintptr_t>(entry);
  std::uintptr_t* frame = return_slot - 7;
  for (int i = 1; i < 7; ++i) {
    frame[i] = 0;
  }
  std::uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  std::memcpy(frame, control, sizeof control);
  context.sp = frame;
}

void switch_context(Context& from, Context& to) { mtlfast_emulation_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t context;
};

void prepare_context(Context& context, unsigned char* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
#endif

struct Barrier {
  int arrived = 0;
  std::uint64_t generation = 0;
  const char* site = nullptr;  // the __syncthreads the arrived threads wait at
};

struct Warp {
  int live = 0;  // lanes that have not returned
  Barrier barrier;
  alignas(8) unsigned char deposits[2][kWarpSize * 8];  // double-buffered: see warp_exchange
};

struct Fiber {
  Context context;
  unsigned char* stack = nullptr;
  ThreadState state;
  int warp = 0;
  int lane = 0;
  int exchange_parity = 0;
  bool done = false;
  // While waiting at a barrier: the barrier's generation counter and the value it had on arrival (the scheduler
  // resumes the fiber once it changed).
  const std::uint64_t* wait_generation = nullptr;
  std::uint64_t arrived_generation = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0;
  Barrier barrier;
  std::uint64_t progress = 0;  // bumped by every arrival, release and exit
  Context scheduler;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* body_context = nullptr;
  std::string error;
};

thread_local Block* running_block = nullptr;
thread_local std::vector<unsigned char*> stack_pool;
thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_message;
thread_local std::int64_t launch_count = 0;
ThreadOrder thread_order = ThreadOrder::kForward;
std::uint64_t order_seed = 0;

unsigned char* stack_for(std::size_t index) {
  while (stack_pool.size() <= index) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("mtlfast CUDA emulation: mmap of a fiber stack");
      std::abort();
    }
    stack_pool.push_back(static_cast<unsigned char*>(p));
  }
  return stack_pool[index];
}

// A thread left mid-kernel (its block deadlocked) never unwinds its frames: under AddressSanitizer their redzones
// would stay poisoned on its stack, which the next launch reuses, and turn that launch's own locals into false
// stack-buffer-overflow reports.
void forget_frames(const Fiber& fiber) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(fiber.stack, kStackBytes);
#else
  (void)fiber;
#endif
}

void fail(Block& block, std::string message) {
  if (block.error.empty()) {
    block.error = std::move(message);
  }
}

// Lets the threads waiting at `barrier` go (they watch its generation).
void release(Barrier& barrier) {
  barrier.arrived = 0;
  barrier.site = nullptr;
  ++barrier.generation;
}

// Arrives at `barrier`, shared by `*live` threads, and waits for the others (or returns at once as the last).
void arrive_and_wait(Block& block, Barrier& barrier, const int* live) {
  const std::uint64_t generation = barrier.generation;
  ++block.progress;
  if (++barrier.arrived == *live) {
    release(barrier);
    return;
  }
  Fiber& self = *block.current;
  self.wait_generation = &barrier.generation;
  self.arrived_generation = generation;
  switch_context(self.context, block.scheduler);  // resumed once the generation moved on
  self.wait_generation = nullptr;
}

// A thread returned: the barriers its peers wait at may now be complete.
void release_if_complete(Barrier& barrier, int live) {
  if (barrier.arrived > 0 && barrier.arrived == live) {
    release(barrier);
  }
}

void fiber_main() {
  Block& block = *running_block;
  Fiber& self = *block.current;
  block.body(block.body_context);
  self.done = true;
  ++block.progress;
  --block.live;
  Warp& warp = block.warps[self.warp];
  --warp.live;
  release_if_complete(block.barrier, block.live);
  release_if_complete(warp.barrier, warp.live);
  switch_context(self.context, block.scheduler);  // never resumed; the stack is reused by the next block
  std::abort();
}

bool warps_in_turn() {
  return thread_order == ThreadOrder::kWarpsForward || thread_order == ThreadOrder::kWarpsReverse;
}

// 0..n-1 in the order the thread order implies: as is, reversed, or shuffled (by the seed and `stream`, which tells
// the blocks' own thread orders and the order of the blocks apart).
constexpr std::uint64_t kBlockOrderStream = ~std::uint64_t(0);

std::vector<std::size_t> ordered(std::size_t n, std::uint64_t stream) {
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t(0));
  if (thread_order == ThreadOrder::kReverse || thread_order == ThreadOrder::kWarpsReverse) {
    std::reverse(order.begin(), order.end());
  } else if (thread_order == ThreadOrder::kShuffled) {
    std::mt19937_64 rng(order_seed * 0x9E3779B97F4A7C15ull + stream);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

// Resumes every runnable fiber of `order` once.
void resume_each(Block& block, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end) {
  for (std::size_t k = begin; k < end; ++k) {
    Fiber& f = block.fibers[order[k]];
    if (f.done || (f.wait_generation != nullptr && *f.wait_generation == f.arrived_generation)) {
      continue;
    }
    block.current = &f;
    switch_context(block.scheduler, f.context);
    block.current = nullptr;
  }
}

// Runs one block to completion, or until its threads deadlock (block.error then says where).
void run_block(Block& block, uint3 block_idx, dim3 grid, dim3 dims, std::uint64_t block_seed) {
  const unsigned threads = dims.x * dims.y * dims.z;
  block.fibers.assign(threads, Fiber{});
  block.warps.assign((threads + kWarpSize - 1) / kWarpSize, Warp{});
  block.live = static_cast<int>(threads);
  block.barrier = Barrier{};
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = block.fibers[i];
    f.state.thread_idx = {i % dims.x, (i / dims.x) % dims.y, i / (dims.x * dims.y)};
    f.state.block_idx = block_idx;
    f.state.block_dim = dims;
    f.state.grid_dim = grid;
    f.warp = static_cast<int>(i / kWarpSize);
    f.lane = static_cast<int>(i % kWarpSize);
    ++block.warps[f.warp].live;
    f.stack = stack_for(i);
    prepare_context(f.context, f.stack, kStackBytes, &fiber_main);
  }
  const std::vector<std::size_t> order = ordered(threads, block_seed);
  while (block.live > 0) {
    const std::uint64_t progress_before = block.progress;
    if (warps_in_turn()) {
      // One warp runs as far as it can before the next one starts: the schedule that exposes a warp overwriting
      // shared memory the other warps have not read yet (a missing barrier after a read).
      for (std::size_t begin = 0; begin < threads; begin += kWarpSize) {
        const std::size_t end = std::min<std::size_t>(threads, begin + kWarpSize);
        std::uint64_t before;
        do {
          before = block.progress;
          resume_each(block, order, begin, end);
        } while (block.progress != before);
      }
    } else {
      resume_each(block, order, 0, threads);
    }
    if (block.live > 0 && block.progress == progress_before) {
      std::string where = block.barrier.arrived > 0 ? std::string(" (") + std::to_string(block.barrier.arrived) +
                                                          " of " + std::to_string(block.live) +
                                                          " threads at __syncthreads " + block.barrier.site + ")"
                                                    : std::string(" (at warp shuffles / votes)");
      fail(block, "deadlock: some threads of block (" + std::to_string(block_idx.x) + ", " +
                      std::to_string(block_idx.y) + ", " + std::to_string(block_idx.z) +
                      ") wait at a barrier the others never reach" + where);
      for (const Fiber& f : block.fibers) {
        if (!f.done) {
          forget_frames(f);
        }
      }
      return;
    }
  }
}

}  // namespace

const ThreadState& current_thread() { return running_block->current->state; }

const unsigned char* warp_exchange(unsigned mask, const void* value, std::size_t size) {
  Block& block = *running_block;
  Fiber& self = *block.current;
  Warp& warp = block.warps[self.warp];
  const unsigned threads = self.state.block_dim.x * self.state.block_dim.y * self.state.block_dim.z;
  const int lanes_in_warp = std::min<int>(kWarpSize, static_cast<int>(threads) - self.warp * kWarpSize);
  const unsigned expected_mask = lanes_in_warp == kWarpSize ? 0xffffffffu : (1u << lanes_in_warp) - 1u;
  if (mask != expected_mask) {
    fail(block, "warp shuffle / vote with mask " + std::to_string(mask) + "; the emulation (and the kernels) use "
                "full-warp masks only");
  }
  if (warp.live != lanes_in_warp) {
    fail(block, "warp shuffle / vote after " + std::to_string(lanes_in_warp - warp.live) +
                    " lanes of the warp returned (undefined with a full mask on a GPU)");
  }
  // Two deposit buffers, used alternately: a lane can only write the buffer of exchange k+2 after every lane has
  // arrived at exchange k+1, i.e. after every lane has read its result of exchange k.
  unsigned char* deposits = warp.deposits[self.exchange_parity];
  self.exchange_parity ^= 1;
  std::memcpy(deposits + 8 * self.lane, value, size);
  arrive_and_wait(block, warp.barrier, &warp.live);
  return deposits;
}

void sync_threads(const char* site) {
  Block& block = *running_block;
  if (block.barrier.arrived > 0 && std::strcmp(block.barrier.site, site) != 0) {
    fail(block, std::string("divergent __syncthreads: threads wait at ") + block.barrier.site + " and at " + site);
  }
  if (block.barrier.arrived == 0) {
    block.barrier.site = site;
  }
  arrive_and_wait(block, block.barrier, &block.live);
}

cudaError_t run_grid(dim3 grid, dim3 block_dims, void (*body)(void*), void* context) {
  ++launch_count;
  const unsigned threads = block_dims.x * block_dims.y * block_dims.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > kMaxThreadsPerBlock ||
      grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    last_message = "invalid launch configuration: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                   ", " + std::to_string(grid.z) + "), " + std::to_string(threads) + " threads per block";
    return last_error;
  }
  if (running_block != nullptr) {
    std::fprintf(stderr, "mtlfast CUDA emulation: a kernel launched from inside a kernel\n");
    std::abort();
  }
  Block block;
  block.body = body;
  block.body_context = context;
  running_block = &block;
  // Blocks run one after the other, in the order the thread order implies (reversed, or shuffled): two blocks
  // writing the same location, or one reading what another writes, then give order-dependent results.
  for (std::size_t b : ordered(std::size_t(grid.x) * grid.y * grid.z, kBlockOrderStream)) {
    const unsigned x = static_cast<unsigned>(b % grid.x);
    const unsigned y = static_cast<unsigned>((b / grid.x) % grid.y);
    const unsigned z = static_cast<unsigned>(b / (std::size_t(grid.x) * grid.y));
    run_block(block, uint3{x, y, z}, grid, block_dims, b);
    if (!block.error.empty()) {
      break;
    }
  }
  running_block = nullptr;
  if (!block.error.empty()) {
    last_error = cudaErrorLaunchFailure;
    last_message = block.error;
  }
  return block.error.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

void set_thread_order(ThreadOrder order, std::uint64_t seed) {
  thread_order = order;
  order_seed = seed;
}

std::int64_t launches() { return launch_count; }

const char* last_error_message() { return last_message.c_str(); }

}  // namespace emulation
}  // namespace mtlfast

cudaError_t cudaGetLastError() {
  const cudaError_t error = mtlfast::emulation::last_error;
  mtlfast::emulation::last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}
