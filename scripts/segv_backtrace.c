// Native backtrace on a crash, for machines without gdb (the lent GPU machines): preload it and a segfault prints
// the C/C++ frames to stderr (after Python's faulthandler, which chains to it), then dies as before. Frames inside
// mtlfast/_C*.so print as offsets (hidden symbols): resolve them with `addr2line -f -C -i -e <that .so> <offset>`.
//   gcc -shared -fPIC -O1 -o /tmp/segv_backtrace.so scripts/segv_backtrace.c
//   LD_PRELOAD=/tmp/segv_backtrace.so python -m pytest ...
// Found the static-libstdc++ crash of 2026-11-23 (benchmarks/results/gpu_h100_2026-11-23.md).
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>
static void on_fault(int sig) {
  void* frames[128];
  int n = backtrace(frames, 128);
  const char msg[] = "\n== native backtrace (segv_backtrace.so) ==\n";
  if (write(2, msg, sizeof msg - 1) < 0) {
    // nothing to do: stderr is gone
  }
  backtrace_symbols_fd(frames, n, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}
__attribute__((constructor)) static void install(void) {
  signal(SIGSEGV, on_fault);
  signal(SIGBUS, on_fault);
  signal(SIGABRT, on_fault);
}
