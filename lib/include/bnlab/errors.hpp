// Error types that the app maps to exit codes: bad input is exit 2, everything else exit 1.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace bnlab {

/// Exit codes shared by every bnlab command.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;     ///< a run failed (e.g. non-finite loss)
inline constexpr int kExitBadInput = 2;    ///< config, command line, data or checkpoint is wrong

/// Bad input from the user. Carries every problem found, each naming where it is
/// (JSON path, file:line:column), so one run of the validator reports them all.
class InputError : public std::runtime_error {
 public:
  explicit InputError(std::vector<std::string> problems);
  explicit InputError(const std::string& problem)
      : InputError(std::vector<std::string>{problem}) {}
  const std::vector<std::string>& problems() const { return problems_; }

 private:
  std::vector<std::string> problems_;
};

/// The user asked the process to stop (SIGINT/SIGTERM) before a result was complete.
class Interrupted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Asks running work to stop at the next safe point (async-signal-safe: one atomic store).
void request_stop();
bool stop_requested();

}  // namespace bnlab
