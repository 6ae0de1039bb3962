// libFuzzer target: the pickle reader behind torch.load-compatible files (PyTorch state dicts,
// checkpoints, TorchScript archives' data.pkl). A document or an InputError, nothing else.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "bnlab/errors.hpp"
#include "pickle.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    (void)bnlab::pickle::parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz.pkl");
  } catch (const bnlab::InputError& e) {
    if (e.problems().empty()) std::abort();
  }
  return 0;
}
