#include "interrupt.h"

#include <Python.h>
#include <torch/csrc/Exceptions.h>

namespace cbd_fast {

Interrupt::Interrupt()
    : caller_(std::this_thread::get_id()), next_poll_(std::chrono::steady_clock::now() + kPollInterval) {}

bool Interrupt::requested() {
  if (!stop_.load(std::memory_order_relaxed) && std::this_thread::get_id() == caller_) poll();
  return stop_.load(std::memory_order_relaxed);
}

void Interrupt::poll() {
  const auto now = std::chrono::steady_clock::now();
  if (now < next_poll_ || !Py_IsInitialized()) return;
  next_poll_ = now + kPollInterval;
  const PyGILState_STATE gil = PyGILState_Ensure();
  if (PyErr_CheckSignals() != 0) {  // a handler raised (KeyboardInterrupt for SIGINT): keep it for the caller
    try {
      python_error error;
      error.persist();
      throw error;
    } catch (...) {
      error_ = std::current_exception();
    }
    stop_.store(true, std::memory_order_relaxed);
  }
  PyGILState_Release(gil);
}

void Interrupt::rethrow_if_requested() const {
  if (error_) std::rethrow_exception(error_);
}

}  // namespace cbd_fast
