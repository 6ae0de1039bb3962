// libFuzzer target: the bounded JSON reader (json_input.hpp) and, on what it accepts, the
// Keras model-config reader (the architecture inside a user's .keras/.h5 file). Either a result
// or an InputError, never a crash, hang or sanitizer report.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "json_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    (void)bnlab::parse_json(text, "fuzz.json");
  } catch (const bnlab::InputError& e) {
    if (e.problems().empty()) std::abort();
    return 0;
  }
  try {
    (void)bnlab::keras_architecture(text, "fuzz.keras", bnlab::BatchNormConfig{});
  } catch (const bnlab::InputError& e) {
    if (e.problems().empty()) std::abort();
  }
  return 0;
}
