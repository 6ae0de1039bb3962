// Which folders bnlab writes into, and which files in them it may replace or remove
// (README, "Data safety"). Torch-free.
//
// A run directory holds `.bnlab-files`, the ledger of every name bnlab has written there; a
// name enters the ledger before its file is created. bnlab replaces or removes a file only if
// its name is in the ledger, so a user's own file is never touched, with or without --force.
// `.bnlab.lock` is held (flock) by the one bnlab process writing the directory.
#pragma once

#include <string>
#include <vector>

namespace bnlab {

/// The ledger's and the lock's names inside a run directory.
inline constexpr const char* kLedgerName = ".bnlab-files";
inline constexpr const char* kLockName = ".bnlab.lock";

/// True for a name bnlab may write in a run directory (its fixed outputs, the store and its
/// logs, pretrained*.pt, sample*.pt, finetuned_*.pt).
bool is_bnlab_output_name(const std::string& name);

/// Checks, writing nothing, that `dir` may receive the results of experiment `experiment`:
/// it must not exist, be empty, or be a bnlab run directory of that experiment (of another one
/// only with `force`); and no file in it that bnlab would write may be one bnlab did not write.
/// Anything else is an InputError naming the folder and what is in it. `what` names the option
/// ("--out", "-o").
void check_output_dir(const std::string& dir, const std::string& experiment, bool force, const std::string& what = "--out");

/// Creates `dir` if needed, takes its lock (an InputError naming the other process if it is
/// held), adopts the ledger, and from then on guards every write and removal bnlab makes in it
/// (claim_path, may_remove). The lock is held until the process ends.
void own_output_dir(const std::string& dir, const std::string& what = "--out");

/// Before bnlab creates or replaces `path` (a file or a folder): in an owned directory or a
/// folder inside one (tensorboard/...), a name not in the ledger whose file exists is refused
/// (InputError: bnlab did not write it); a new name is recorded in the ledger first, relative
/// to the run directory ("tensorboard/train"). Elsewhere, nothing to check.
void claim_path(const std::string& path);

/// Whether bnlab may remove `path`: in an owned directory (or below it) only a ledger name;
/// elsewhere yes.
bool may_remove(const std::string& path);

/// The ledger names of owned directory `dir` that begin with `prefix` ("tensorboard/").
std::vector<std::string> ledger_names_under(const std::string& dir, const std::string& prefix);

/// A standalone output file named by the user (export -o, golden -o, --junit): refused up
/// front if something already exists there, unless its first 4 KiB hold `signature`, text only
/// bnlab's own file of that kind begins with (a golden file's format tag); "": always refused.
void check_new_output_file(const std::string& path, const std::string& what, const std::string& signature = "");

}  // namespace bnlab
