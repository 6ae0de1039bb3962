// libFuzzer target: config parsing and validation must end in a Config or an InputError,
// never a crash, hang or sanitizer report; an accepted config must round-trip through
// config.resolved.json unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  // Inputs that start with "--set " carry one override on their first line, so overrides
  // (paths, values, arrays) are fuzzed too.
  std::vector<std::string> overrides;
  if (text.rfind("--set ", 0) == 0) {
    const auto nl = text.find('\n');
    overrides.push_back(text.substr(6, nl == std::string::npos ? std::string::npos : nl - 6));
    text = nl == std::string::npos ? "" : text.substr(nl + 1);
  }
  try {
    const bnlab::Config c = bnlab::parse_config(text, "fuzz.json", overrides);
    const std::string resolved = bnlab::to_json(c);
    const bnlab::Config again = bnlab::parse_config(resolved, "resolved.json");
    if (bnlab::to_json(again) != resolved) std::abort();  // the resolved config must read back the same
    (void)bnlab::pretrain_cache_key(c);
  } catch (const bnlab::InputError& e) {
    if (e.problems().empty()) std::abort();  // every refusal says why
  }
  return 0;
}
