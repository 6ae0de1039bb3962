// bnlab's command line: parse arguments, load and validate the config, call the library.
#include <csignal>
#include <cstdio>
// Each --set is one PATH=VALUE even when VALUE is a JSON list: cxxopts would otherwise split
// repeated-option values at commas.
#define CXXOPTS_VECTOR_DELIMITER '\0'
#include <cxxopts.hpp>
#include <iostream>
#include <new>
#include <optional>
#include <string>
#include <vector>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/run.hpp"
#include "bnlab/tools.hpp"

namespace {

volatile std::sig_atomic_t g_signal = 0;

/// First SIGINT/SIGTERM: finish the runs in flight, save, and exit 128 + signal. A second one
/// ends the process at once (everything on disk is still complete: files are renamed into place).
extern "C" void on_signal(int sig) {
  if (g_signal != 0) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_signal = sig;
  bnlab::request_stop();
}

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

int interrupted_exit() { return 128 + (g_signal != 0 ? static_cast<int>(g_signal) : SIGINT); }

constexpr const char* kUsage =
    "usage: bnlab <command> [options]\n"
    "\n"
    "commands:\n"
    "  run CONFIG      pretrain (cached), fine-tune one sample under every strategy, write the run directory\n"
    "  explain CONFIG  why training and inference losses differ: per BatchNorm layer and per strategy\n"
    "  validate CONFIG check a config and print it resolved (defaults filled in); writes nothing\n"
    "  golden RUN_DIR -o FILE              write a golden file of every curve point and summary figure\n"
    "  check RUN_DIR --golden FILE         compare with a golden file; exit 1 and print a diff on mismatch\n"
    "  merge DIR... -o DIR                 combine the shard directories of one study\n"
    "  export RUN_DIR --strategy NAME --format keras-h5|torch [--as state_dict|checkpoint|torchscript] -o FILE\n"
    "                                              fine-tuned weights for Keras or PyTorch\n"
    "\n"
    "  bnlab <command> --help   options of a command\n"
    "  bnlab --version\n";

int bad_input(const std::vector<std::string>& problems) {
  std::cerr << "bnlab: error: " << (problems.size() == 1 ? "" : std::to_string(problems.size()) + " problems:\n");
  for (const auto& p : problems) std::cerr << (problems.size() == 1 ? "" : "  ") << p << "\n";
  return bnlab::kExitBadInput;
}

/// Parses a command's options; returns an exit code when the command is already done
/// (--help) or the arguments are bad, nothing when it should go on.
std::optional<int> parse_args(cxxopts::Options& opts, int argc, char** argv, const std::string& name,
                              cxxopts::ParseResult& args) {
  try {
    args = opts.parse(argc, argv);
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "bnlab " << name << ": error: " << e.what() << "\n" << opts.help();
    return bnlab::kExitBadInput;
  }
  if (args.count("help")) {
    std::cout << opts.help();
    return bnlab::kExitOk;
  }
  return std::nullopt;
}

enum class Command { kRun, kValidate, kExplain };

int cmd_run(int argc, char** argv, Command command) {
  const bool validate_only = command == Command::kValidate;
  const std::string name = validate_only ? "validate" : command == Command::kRun ? "run" : "explain";
  cxxopts::Options opts("bnlab " + name, validate_only ? "Check a config; print it resolved."
                                         : command == Command::kRun
                                             ? "Fine-tune one sample under each strategy."
                                             : "Explain, per BatchNorm layer and per strategy, why training and inference losses differ.");
  opts.add_options()
      ("config", "experiment file (JSON)", cxxopts::value<std::string>())
      ("set", "override a config value: PATH=VALUE, e.g. finetune.epochs=20 (repeatable)",
       cxxopts::value<std::vector<std::string>>())
      ("h,help", "show this help");
  if (!validate_only) {
    opts.add_options()
        ("o,out", "run directory (default runs/<name>)", cxxopts::value<std::string>())
        ("force", "overwrite a directory holding another experiment; pretrain again")
        ("threads", "intra-op threads (fixed for reproducibility)", cxxopts::value<int>()->default_value("1"))
        ("v,verbose", "0 silent, 1 progress, 2 one line per epoch (default: 2 for up to 20 runs, else 1)",
         cxxopts::value<int>());
  }
  if (command == Command::kRun) {
    opts.add_options()
        ("j,jobs", "runs executed concurrently (default: all cores); results do not depend on it", cxxopts::value<int>())
        ("shard", "run only shard I of N of the study's runs, e.g. 2/8 (see bnlab merge)", cxxopts::value<std::string>())
        ("engine", "auto | batched | torch: batched runs many samples as one set of batched kernels; torch is "
                   "torch::nn + autograd, the reference (default auto = batched where it applies)",
         cxxopts::value<std::string>()->default_value("auto"))
        ("lanes", "batched engine: samples fine-tuned together per work item", cxxopts::value<int>()->default_value("16"))
        ("no-plots", "do not render curves.png/svg and gap_distribution.png/svg")
        ("export", "text exports besides study.sqlite: auto (all of them up to report.export_limit runs), none, or a "
                   "list of curves,metrics,runs (sets report.export)", cxxopts::value<std::string>());
  }
  if (command == Command::kExplain) {
    opts.add_options()
        ("sample", "sample index (default: finetune.sample)", cxxopts::value<int64_t>())
        ("strategy", "only this strategy (default: all of the config's)", cxxopts::value<std::string>());
  }
  opts.parse_positional({"config"});
  opts.positional_help("CONFIG");
  cxxopts::ParseResult args;
  if (const auto done = parse_args(opts, argc, argv, name, args)) return *done;
  if (!args.count("config")) {
    std::cerr << "bnlab " << name << ": error: missing CONFIG (a JSON experiment file, e.g. configs/seed_repro.json)\n";
    return bnlab::kExitBadInput;
  }
  std::vector<std::string> overrides;
  if (args.count("set")) overrides = args["set"].as<std::vector<std::string>>();
  if (command == Command::kRun && args.count("export")) {
    // --export is report.export: checked by the config's own validation, named as what it sets.
    const std::string spec = args["export"].as<std::string>();
    std::string list;
    if (spec == "auto") {
      list = "\"auto\"";
    } else if (spec != "none") {
      std::string item;
      for (size_t i = 0; i <= spec.size(); ++i) {
        if (i == spec.size() || spec[i] == ',') {
          list += std::string(list.empty() ? "" : ",") + "\"" + item + "\"";
          item.clear();
        } else if (spec[i] == '"' || spec[i] == '\\' || static_cast<unsigned char>(spec[i]) < 0x20) {
          return bad_input({"--export: expected auto, none or a comma-separated list of curves, metrics, runs; got \"" + spec + "\""});
        } else {
          item += spec[i];
        }
      }
    }
    overrides.push_back("report.export=" + (spec == "auto" ? list : "[" + list + "]"));
  }
  const bnlab::Config config = bnlab::load_config(args["config"].as<std::string>(), overrides, bnlab::model_file_readers());
  if (validate_only) {
    std::cout << bnlab::to_json(config);
    return bnlab::kExitOk;
  }
  const std::string out_dir = args.count("out") ? args["out"].as<std::string>() : "";
  const bool force = args.count("force") > 0;
  const int threads = args["threads"].as<int>();
  const int verbose = args.count("verbose") ? args["verbose"].as<int>() : -1;
  if (threads < 1) return bad_input({"--threads: must be >= 1, got " + std::to_string(threads)});
  if (args.count("verbose") && (verbose < 0 || verbose > 2))
    return bad_input({"--verbose: must be 0, 1 or 2, got " + std::to_string(verbose)});
  if (command == Command::kExplain) {
    bnlab::ExplainOptions eo;
    eo.out_dir = out_dir;
    eo.force = force;
    eo.threads = threads;
    eo.verbose = verbose < 0 ? 1 : verbose;
    if (args.count("sample")) {
      eo.sample = args["sample"].as<int64_t>();
      if (eo.sample < 0) return bad_input({"--sample: must be >= 0, got " + std::to_string(eo.sample)});
    }
    if (args.count("strategy")) eo.strategy = args["strategy"].as<std::string>();
    bnlab::explain(config, eo, std::cout, std::cerr);
    return bnlab::kExitOk;
  }
  bnlab::RunOptions ro;
  ro.out_dir = out_dir;
  ro.force = force;
  ro.threads = threads;
  ro.verbose = verbose;
  ro.plots = args.count("no-plots") == 0;
  ro.engine = args["engine"].as<std::string>();
  ro.lanes = args["lanes"].as<int>();
  if (args.count("jobs")) {
    ro.jobs = args["jobs"].as<int>();
    if (ro.jobs < 1) return bad_input({"--jobs: must be >= 1, got " + std::to_string(ro.jobs)});
  }
  if (args.count("shard")) {
    const std::string spec = args["shard"].as<std::string>();
    int i = 0, n = 0;
    char tail = 0;
    if (std::sscanf(spec.c_str(), "%d/%d%c", &i, &n, &tail) != 2 || n < 1 || i < 1 || i > n)
      return bad_input({"--shard: expected I/N with 1 <= I <= N (e.g. 3/8), got \"" + spec + "\""});
    ro.shard_index = i;
    ro.shard_count = n;
  }
  ro.argv.assign(argv - 1, argv + argc);
  install_signal_handlers();
  const auto result = bnlab::run(config, ro, std::cerr);
  if (result.interrupted) return interrupted_exit();
  return result.failed > 0 ? bnlab::kExitFailure : bnlab::kExitOk;
}

/// golden, check and merge: small commands over finished run directories.
int cmd_tool(int argc, char** argv, const std::string& name) {
  cxxopts::Options opts("bnlab " + name, name == "golden"  ? "Write a golden file of a run directory."
                                         : name == "check" ? "Compare a run directory with a golden file."
                                         : name == "export" ? "Export a strategy's fine-tuned weights."
                                                            : "Merge the shard directories of one study.");
  opts.add_options()("dirs", "run directories", cxxopts::value<std::vector<std::string>>())("h,help", "show this help");
  if (name != "check") opts.add_options()("o,out", "output file (golden) or directory (merge)", cxxopts::value<std::string>());
  if (name == "check") {
    opts.add_options()
        ("golden", "golden file", cxxopts::value<std::string>())
        ("rtol", "relative tolerance", cxxopts::value<double>()->default_value("1e-5"))
        ("atol", "absolute tolerance", cxxopts::value<double>()->default_value("1e-8"))
        ("junit", "also write JUnit XML to this file", cxxopts::value<std::string>());
  }
  if (name == "merge") {
    opts.add_options()("force", "overwrite an output directory with results")("no-plots", "do not render plots");
  }
  if (name == "export") {
    opts.add_options()
        ("strategy", "the strategy whose fine-tuned (best) weights to export", cxxopts::value<std::string>())
        ("format", "keras-h5 (Keras 2 model.save() HDF5) or torch", cxxopts::value<std::string>())
        ("as", "with --format torch: state_dict (default), checkpoint or torchscript", cxxopts::value<std::string>());
  }
  opts.parse_positional({"dirs"});
  opts.positional_help(name == "merge" ? "SHARD_DIR..." : "RUN_DIR");
  cxxopts::ParseResult args;
  if (const auto done = parse_args(opts, argc, argv, name, args)) return *done;
  const auto dirs = args.count("dirs") ? args["dirs"].as<std::vector<std::string>>() : std::vector<std::string>{};
  if (dirs.empty()) return bad_input({"bnlab " + name + ": missing " + (name == "merge" ? "SHARD_DIR..." : "RUN_DIR")});
  if (name != "merge" && dirs.size() != 1) return bad_input({"bnlab " + name + ": expected one RUN_DIR, got " + std::to_string(dirs.size())});
  if (name == "golden") {
    if (!args.count("out")) return bad_input({"bnlab golden: missing -o FILE"});
    bnlab::write_golden(dirs[0], args["out"].as<std::string>());
    std::cerr << "golden written to " << args["out"].as<std::string>() << "\n";
    return bnlab::kExitOk;
  }
  if (name == "check") {
    if (!args.count("golden")) return bad_input({"bnlab check: missing --golden FILE"});
    bnlab::CheckOptions co;
    co.rtol = args["rtol"].as<double>();
    co.atol = args["atol"].as<double>();
    if (args.count("junit")) co.junit = args["junit"].as<std::string>();
    const size_t bad = bnlab::check_golden(dirs[0], args["golden"].as<std::string>(), co, std::cout);
    return bad == 0 ? bnlab::kExitOk : bnlab::kExitFailure;
  }
  if (name == "export") {
    if (!args.count("strategy") || !args.count("format") || !args.count("out"))
      return bad_input({"bnlab export: needs --strategy NAME, --format keras-h5|torch and -o FILE"});
    bnlab::export_weights(dirs[0], args["strategy"].as<std::string>(), args["format"].as<std::string>(), args["out"].as<std::string>(),
                          args.count("as") ? args["as"].as<std::string>() : "");
    std::cerr << "exported " << args["strategy"].as<std::string>() << " to " << args["out"].as<std::string>() << "\n";
    return bnlab::kExitOk;
  }
  if (!args.count("out")) return bad_input({"bnlab merge: missing -o DIR"});
  bnlab::merge_shards(dirs, args["out"].as<std::string>(), args.count("force") > 0, args.count("no-plots") == 0, std::cerr);
  return bnlab::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef __GLIBC__
  // Freed memory up to 64 MiB stays in the process for the next allocation instead of going back
  // to the system: glibc otherwise maps blocks from 128 KiB up (a threshold it raises as such
  // blocks are freed) afresh and returns them on free,
  // and on a virtual machine each first write to a fresh 4 KiB page costs some 10 us (measured on
  // the development VM; docs/performance.md). A study's first fine-tuning Net (0.7 MB for 16 lanes
  // of seed_repro) then reuses pages the data and model set-up already wrote: 2 ms less per
  // worker. Blocks from 4 MiB up are still mapped and unmapped whole. Peak memory of the
  // 100,000-sample, nine-preset study: 278 MiB before, 264-270 after (256 MiB and 1 GiB: 298).
  mallopt(M_MMAP_THRESHOLD, 4 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
  if (argc < 2) {
    std::cerr << kUsage;
    return bnlab::kExitBadInput;
  }
  const std::string command = argv[1];
  if (const std::string isa = bnlab::isa_environment_error(); !isa.empty()) {
    std::cerr << "bnlab: error: " << isa << "\n";
    return bnlab::kExitBadInput;
  }
  try {
    if (command == "--help" || command == "-h" || command == "help") {
      std::cout << kUsage;
      return bnlab::kExitOk;
    }
    if (command == "--version") {
      std::cout << bnlab::version_string() << "\n";
      return bnlab::kExitOk;
    }
    if (command == "run") return cmd_run(argc - 1, argv + 1, Command::kRun);
    if (command == "validate") return cmd_run(argc - 1, argv + 1, Command::kValidate);
    if (command == "explain") return cmd_run(argc - 1, argv + 1, Command::kExplain);
    if (command == "golden" || command == "check" || command == "merge" || command == "export")
      return cmd_tool(argc - 1, argv + 1, command);
    std::cerr << "bnlab: error: unknown command \"" << command << "\"\n" << kUsage;
    return bnlab::kExitBadInput;
  } catch (const bnlab::InputError& e) {
    return bad_input(e.problems());
  } catch (const bnlab::Interrupted& e) {
    std::cerr << "bnlab: " << e.what() << "; nothing to resume yet: run the same command again\n";
    return interrupted_exit();
  } catch (const std::bad_alloc&) {
    std::cerr << "bnlab: failed: out of memory (a study keeps the runs it finished in its study.sqlite; "
                 "rerun it with fewer --jobs or --lanes to resume)\n";
    return bnlab::kExitFailure;
  } catch (const std::exception& e) {
    std::string what = e.what();
    // LibTorch messages carry a C++ backtrace after the first line; users need the first line.
    const auto nl = what.find("\nException raised from");
    if (nl != std::string::npos) what = what.substr(0, nl);
    std::cerr << "bnlab: failed: " << what << "\n";
    return bnlab::kExitFailure;
  }
}
