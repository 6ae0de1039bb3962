// bnlab's command line: parse arguments, load and validate the config, call the library.
#include <cxxopts.hpp>
#include <iostream>
#include <string>
#include <vector>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/run.hpp"

namespace {

constexpr const char* kUsage =
    "usage: bnlab <command> [options]\n"
    "\n"
    "commands:\n"
    "  run CONFIG      pretrain (cached), fine-tune one sample under every strategy, write the run directory\n"
    "  validate CONFIG check a config and print it resolved (defaults filled in); writes nothing\n"
    "\n"
    "  bnlab <command> --help   options of a command\n"
    "  bnlab --version\n";

int bad_input(const std::vector<std::string>& problems) {
  std::cerr << "bnlab: error: " << (problems.size() == 1 ? "" : std::to_string(problems.size()) + " problems:\n");
  for (const auto& p : problems) std::cerr << (problems.size() == 1 ? "" : "  ") << p << "\n";
  return bnlab::kExitBadInput;
}

int cmd_run(int argc, char** argv, bool validate_only) {
  const std::string name = validate_only ? "validate" : "run";
  cxxopts::Options opts("bnlab " + name, validate_only ? "Check a config; print it resolved." :
                                                          "Fine-tune one sample under each strategy.");
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
        ("v,verbose", "0 silent, 1 progress and epoch lines, 2 more detail", cxxopts::value<int>()->default_value("1"));
  }
  opts.parse_positional({"config"});
  opts.positional_help("CONFIG");
  cxxopts::ParseResult args;
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
  if (!args.count("config")) {
    std::cerr << "bnlab " << name << ": error: missing CONFIG (a JSON experiment file, e.g. configs/seed_repro.json)\n";
    return bnlab::kExitBadInput;
  }
  std::vector<std::string> overrides;
  if (args.count("set")) overrides = args["set"].as<std::vector<std::string>>();
  const bnlab::Config config = bnlab::load_config(args["config"].as<std::string>(), overrides);
  if (validate_only) {
    std::cout << bnlab::to_json(config);
    return bnlab::kExitOk;
  }
  bnlab::RunOptions ro;
  if (args.count("out")) ro.out_dir = args["out"].as<std::string>();
  ro.force = args.count("force") > 0;
  ro.threads = args["threads"].as<int>();
  ro.verbose = args["verbose"].as<int>();
  if (ro.threads < 1) return bad_input({"--threads: must be >= 1, got " + std::to_string(ro.threads)});
  if (ro.verbose < 0 || ro.verbose > 2) return bad_input({"--verbose: must be 0, 1 or 2, got " + std::to_string(ro.verbose)});
  ro.argv.assign(argv - 1, argv + argc);
  bnlab::run(config, ro, std::cerr);
  return bnlab::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return bnlab::kExitBadInput;
  }
  const std::string command = argv[1];
  try {
    if (command == "--help" || command == "-h" || command == "help") {
      std::cout << kUsage;
      return bnlab::kExitOk;
    }
    if (command == "--version") {
      std::cout << bnlab::version_string() << "\n";
      return bnlab::kExitOk;
    }
    if (command == "run") return cmd_run(argc - 1, argv + 1, false);
    if (command == "validate") return cmd_run(argc - 1, argv + 1, true);
    std::cerr << "bnlab: error: unknown command \"" << command << "\"\n" << kUsage;
    return bnlab::kExitBadInput;
  } catch (const bnlab::InputError& e) {
    return bad_input(e.problems());
  } catch (const std::exception& e) {
    std::string what = e.what();
    // LibTorch messages carry a C++ backtrace after the first line; users need the first line.
    const auto nl = what.find("\nException raised from");
    if (nl != std::string::npos) what = what.substr(0, nl);
    std::cerr << "bnlab: failed: " << what << "\n";
    return bnlab::kExitFailure;
  }
}
