// Picks the lane kernels' instruction set once, at first use (see lane_kernels.hpp).
#include "lane_kernels.hpp"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace bnlab::lanes {

namespace portable { const Kernels& kernels(); }
namespace avx2 { const Kernels& kernels(); }
namespace avx512 { const Kernels& kernels(); }

namespace {

bool runs(const std::string& isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  if (isa == "avx2") return __builtin_cpu_supports("avx2");
#endif
  return isa == "portable";
}

const Kernels* by_name(const std::string& isa) {
  if (!runs(isa)) return nullptr;
  if (isa == "avx512") return &avx512::kernels();
  if (isa == "avx2") return &avx2::kernels();
  return &portable::kernels();
}

/// Why BNLAB_ISA cannot be used ("" when it is unset or names a path this CPU runs).
std::string forced_error() {
  const char* forced = std::getenv("BNLAB_ISA");
  if (forced == nullptr || *forced == '\0' || by_name(forced) != nullptr) return "";
  std::string list;
  for (const auto& isa : available()) list += (list.empty() ? "" : ", ") + isa;
  return std::string("BNLAB_ISA=") + forced + ": not an instruction set this CPU runs (it runs " + list +
         "; unset BNLAB_ISA to pick the best)";
}

const Kernels* best() {
  // The command line refuses a bad BNLAB_ISA before any work (isa_environment_error); a program
  // using the library gets the same message as an exception on the first use of the kernels.
  const std::string error = forced_error();
  if (!error.empty()) throw std::runtime_error(error);
  const char* forced = std::getenv("BNLAB_ISA");
  if (forced != nullptr && *forced != '\0') return by_name(forced);
  for (const char* isa : {"avx512", "avx2"})
    if (const Kernels* k = by_name(isa)) return k;
  return &portable::kernels();
}

std::atomic<const Kernels*> chosen{nullptr};  // set_isa's choice, or best() at first use

}  // namespace

const Kernels& active() {
  const Kernels* k = chosen.load(std::memory_order_relaxed);
  if (k == nullptr) {  // first use (several threads may get here; they all pick the same)
    k = best();
    chosen.store(k, std::memory_order_relaxed);
  }
  return *k;
}

std::vector<std::string> available() {
  std::vector<std::string> out;
  for (const char* isa : {"portable", "avx2", "avx512"})
    if (runs(isa)) out.emplace_back(isa);
  return out;
}

bool set_isa(const std::string& isa) {
  const Kernels* k = by_name(isa);
  if (k == nullptr) return false;
  chosen.store(k, std::memory_order_relaxed);
  return true;
}

}  // namespace bnlab::lanes

namespace bnlab {

std::string isa_environment_error() { return lanes::forced_error(); }

}  // namespace bnlab
