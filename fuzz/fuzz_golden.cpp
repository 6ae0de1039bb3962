// libFuzzer target: a golden file of any bytes, as `bnlab check RUN --golden FILE --junit X`
// meets it, against a real run directory (the smoke keras_nll study's store from the store
// corpus, named by BNLAB_FUZZ_STORE, which scripts/fuzz.sh sets). A count of mismatches with
// its report and JUnit XML, or an InputError naming the file, never a crash.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "bnlab/errors.hpp"
#include "bnlab/tools.hpp"
#include "text.hpp"

namespace {

std::string make_run_dir() {
  char tmpl[] = "/tmp/bnlab_fuzz_golden_XXXXXX";
  const std::string dir(::mkdtemp(tmpl));
  const char* store = std::getenv("BNLAB_FUZZ_STORE");
  if (store == nullptr) {
    std::fprintf(stderr, "fuzz_golden: set BNLAB_FUZZ_STORE to a study.sqlite (scripts/fuzz.sh does)\n");
    std::abort();
  }
  bnlab::write_file_atomic(dir + "/study.sqlite", bnlab::read_file(store));
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    const std::string d = make_run_dir();
    // The fixture itself must check clean against its own golden, or every input below would
    // only ever meet the "not a run directory" refusal.
    bnlab::write_golden(d, d + "/own.json");
    std::ostringstream sink;
    if (bnlab::check_golden(d, d + "/own.json", {}, sink) != 0) std::abort();
    return d;
  }();
  const std::string golden = dir + "/golden.json", junit = dir + "/junit.xml";
  std::remove(junit.c_str());
  FILE* f = std::fopen(golden.c_str(), "wb");
  if (f == nullptr) std::abort();
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  bnlab::CheckOptions options;
  options.junit = junit;
  std::ostringstream out;
  try {
    (void)bnlab::check_golden(dir, golden, options, out);
  } catch (const bnlab::InputError& e) {  // a malformed golden file is bad input, named (exit 2)
    if (e.problems().empty()) std::abort();
  }
  return 0;
}
