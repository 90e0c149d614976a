// Ctrl-C for long CPU kernels.
//
// Python turns SIGINT into KeyboardInterrupt only while the interpreter runs (its C-level handler just records the
// signal), and PyErr_CheckSignals, which runs the Python-level handlers, needs the GIL and acts only on the main
// thread, so it cannot be called from the kernels' OpenMP workers. Instead the work loops call requested() between
// work items (and every few draws inside long ones): on the thread that called the op it checks Python's signal
// state, at most every kPollInterval and holding the GIL just for that; on every thread it reads one shared flag.
// Once set, every thread skips its remaining work, and after the parallel region rethrow() raises the Python
// exception (KeyboardInterrupt) to the op's caller. Without a Python interpreter nothing is checked.
#pragma once

#include <atomic>
#include <chrono>
#include <exception>
#include <thread>

namespace cbd_fast {

class Interrupt {
 public:
  // How often the calling thread looks at Python's signal state: rarely enough to cost nothing, often enough that
  // Ctrl-C feels immediate. An op shorter than this never checks.
  static constexpr std::chrono::milliseconds kPollInterval{50};

  Interrupt();  // on the thread that runs the op

  // True once an interrupt has been seen; call it from any thread between work items.
  bool requested();

  // After the parallel region: raises the exception the signal handler raised, if any.
  void rethrow_if_requested() const;

 private:
  void poll();

  std::thread::id caller_;
  std::chrono::steady_clock::time_point next_poll_;
  std::atomic<bool> stop_{false};
  std::exception_ptr error_;
};

}  // namespace cbd_fast
