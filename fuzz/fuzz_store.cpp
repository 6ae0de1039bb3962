// libFuzzer target: a study.sqlite as merge, export, golden and check meet it in a run
// directory: any bytes, opened read-only, its metadata and every run read; then, where it opens
// as a study (its config parses), `bnlab golden` and `bnlab merge` of it as the only shard. A
// store's content or an InputError (foreign, corrupt, wrong format), never a crash.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>

#include "bnlab/tools.hpp"

#include "bnlab/errors.hpp"
#include "store.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    char tmpl[] = "/tmp/bnlab_fuzz_store_XXXXXX";
    return std::string(::mkdtemp(tmpl));
  }();
  const std::string path = dir + "/study.sqlite";
  for (const char* suffix : {"", "-journal", "-wal", "-shm"}) std::remove((path + suffix).c_str());
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    const bnlab::Store s = bnlab::Store::open(path, false);
    (void)s.meta("config");
    (void)s.status_counts();
    (void)s.read_all();
  } catch (const bnlab::InputError& e) {
    if (e.problems().empty()) std::abort();
    return 0;
  }
  const std::string golden = dir + ".golden.json", merged = dir + ".merged";
  std::remove(golden.c_str());
  std::filesystem::remove_all(merged);
  try {
    bnlab::write_golden(dir, golden);
    std::ostringstream log;
    bnlab::merge_shards({dir}, merged, false, false, log);
  } catch (const bnlab::InputError& e) {  // every damage is bad input, named (exit 2)
    if (e.problems().empty()) std::abort();
  }
  return 0;
}
