#!/usr/bin/env python3
"""The CI recipes of docs/ci.md, checked so that they cannot rot.

1. yamllint (--strict, tests/ci/yamllint.yml) passes on docs/ci/github-actions.yml and
   docs/ci/gitlab-ci.yml.
2. Their structure: the GitHub workflow has `on`, a job on runs-on + container debian:12 whose
   steps check out, call scripts/setup.sh, scripts/build.sh bnlab_app and scripts/ci_smoke.sh in
   that order, upload the JUnit file ci_smoke.sh writes (if: always()) and show it in a report
   step, with official actions only; the GitLab job has image debian:12, the same three calls, and
   artifacts (when: always) with reports.junit at the same path.
3. .ci/run runs scripts/test.sh, then scripts/ci_smoke.sh in a mktemp -d folder, with no exec
   before it.
4. The two ```yaml blocks of docs/ci.md are byte-identical to the two files.
5. scripts/ci_smoke.sh itself, in a temporary folder: its JUnit XML parses, failures="0", at least
   one test case; a rerun into the same folder works; the GitHub report step runs on it; a failing
   run or check makes it exit non-zero, a stale junit.xml of bnlab's is not left behind, and a
   junit.xml bnlab did not write is left alone.
Every checker is also shown to reject a broken input (mutated copies, in memory).
Usage: test_ci_recipes.py BNLAB_BINARY|BUILD_DIR SOURCE_DIR
(BNLAB_BINARY must be BUILD_DIR/bin/bnlab: ci_smoke.sh finds bnlab through BNLAB_BUILD_DIR.)
"""
import copy
import difflib
import os
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import yaml

if len(sys.argv) != 3:
    sys.exit("usage: test_ci_recipes.py BNLAB_BINARY|BUILD_DIR SOURCE_DIR")
SRC = os.path.abspath(sys.argv[2])
if os.path.isdir(sys.argv[1]):
    BUILD = os.path.abspath(sys.argv[1])
else:
    BUILD = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[1])))
BIN = os.path.join(BUILD, "bin", "bnlab")
if not os.access(BIN, os.X_OK) or (not os.path.isdir(sys.argv[1]) and not os.path.samefile(BIN, sys.argv[1])):
    sys.exit(f"test_ci_recipes.py: {sys.argv[1]}: expected a build folder with bin/bnlab, or the bnlab binary in one")

GITHUB = "docs/ci/github-actions.yml"
GITLAB = "docs/ci/gitlab-ci.yml"
DOC = "docs/ci.md"
CI_RUN = ".ci/run"
SMOKE = "scripts/ci_smoke.sh"
ALLOWED_ACTIONS = {"actions/checkout@v4", "actions/upload-artifact@v4"}
SCRIPTS = ("scripts/setup.sh", "scripts/build.sh", "scripts/ci_smoke.sh")

passed = 0
failed = 0


def read(rel):
    with open(os.path.join(SRC, rel), encoding="utf-8") as f:
        return f.read()


def report(name, problems):
    """One check: passes when `problems` is empty."""
    global passed, failed
    if problems:
        failed += 1
        print(f"FAIL {name}")
        for p in problems:
            print(f"  - {p}")
    else:
        passed += 1
        print(f"ok   {name}")


def expect_rejected(name, checker, bad_input):
    """A self-test: `checker` must find something wrong with `bad_input`."""
    problems = checker(bad_input)
    report(f"self-test: rejects {name}", [] if problems else ["the checker accepted it"])


# ---- script calls in shell text ---------------------------------------------------------------

def script_calls(text):
    """[(script, args)] for every line of shell `text` that calls one of SCRIPTS."""
    calls = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell (a heredoc's body, say)
            continue
        if words[:1] in (["bash"], ["sh"]):
            words = words[1:]
        if words and words[0].startswith("./"):
            words[0] = words[0][2:]
        if words and words[0] in SCRIPTS:
            calls.append((words[0], words[1:]))
    return calls


def smoke_junit(args):
    """The JUnit path scripts/ci_smoke.sh writes when called with `args`."""
    return posixpath.normpath(posixpath.join(args[0] if args else "ci-out", "junit.xml"))


def sequence_problems(calls, where):
    """calls: [(position, script, args)] in order. Returns (problems, junit path or None)."""
    problems = []
    positions = {}
    for s in SCRIPTS:
        found = [(pos, args) for pos, script, args in calls if script == s]
        if len(found) != 1:
            problems.append(f"{where}: expected one call of {s}, found {len(found)}")
        else:
            positions[s] = found[0]
    if "scripts/build.sh" in positions and positions["scripts/build.sh"][1] != ["bnlab_app"]:
        problems.append(f"{where}: scripts/build.sh must be called as `scripts/build.sh bnlab_app`")
    if "scripts/ci_smoke.sh" in positions and len(positions["scripts/ci_smoke.sh"][1]) > 1:
        problems.append(f"{where}: scripts/ci_smoke.sh takes at most one argument (OUT_DIR)")
    if len(positions) == 3:
        order = [positions[s][0] for s in SCRIPTS]
        if not order[0] < order[1] < order[2]:
            problems.append(f"{where}: the calls must come in the order {', '.join(SCRIPTS)}")
    junit = smoke_junit(positions["scripts/ci_smoke.sh"][1]) if "scripts/ci_smoke.sh" in positions else None
    return problems, junit


def always(condition):
    return isinstance(condition, str) and "always()" in condition.replace(" ", "")


# ---- 2. GitHub Actions ------------------------------------------------------------------------

def github_junit(doc):
    for job in (doc.get("jobs") or {}).values():
        calls = []
        for i, step in enumerate((job or {}).get("steps") or []):
            if isinstance(step, dict) and isinstance(step.get("run"), str):
                calls += [(i, s, a) for s, a in script_calls(step["run"])]
        for _, s, a in calls:
            if s == "scripts/ci_smoke.sh":
                return smoke_junit(a)
    return None


def github_problems(doc):
    if not isinstance(doc, dict):
        return ["the workflow is not a mapping"]
    problems = []
    on = doc.get("on", doc.get(True))  # YAML 1.1 reads the key `on` as the boolean true
    triggers = on if isinstance(on, (list, dict)) else [on] if isinstance(on, str) else []
    if not triggers:
        problems.append("no `on:` triggers")
    elif not {"push", "pull_request"} & set(triggers):
        problems.append("`on:` has neither push nor pull_request")
    jobs = doc.get("jobs")
    if not isinstance(jobs, dict) or not jobs:
        return problems + ["no jobs"]
    for name, job in jobs.items():
        where = f"jobs.{name}"
        if not isinstance(job, dict):
            problems.append(f"{where}: not a mapping")
            continue
        container = job.get("container")
        image = container.get("image") if isinstance(container, dict) else container
        if image != "debian:12":
            problems.append(f"{where}: container must be debian:12, not {image!r}")
        if not job.get("runs-on"):
            problems.append(f"{where}: no runs-on")
        steps = job.get("steps")
        if not isinstance(steps, list) or not steps:
            problems.append(f"{where}: no steps")
            continue
        calls, uses = [], {}
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                problems.append(f"{where}.steps[{i}]: not a mapping")
                continue
            if "uses" in step:
                uses[i] = step["uses"]
                if step["uses"] not in ALLOWED_ACTIONS:
                    problems.append(f"{where}.steps[{i}]: uses {step['uses']!r}; only {sorted(ALLOWED_ACTIONS)}")
            if isinstance(step.get("run"), str):
                calls += [(i, s, a) for s, a in script_calls(step["run"])]
        seq, junit = sequence_problems(calls, where)
        problems += seq
        checkout = [i for i, u in uses.items() if u == "actions/checkout@v4"]
        first_call = min((i for i, _, _ in calls), default=None)
        if not checkout or (first_call is not None and checkout[0] > first_call):
            problems.append(f"{where}: actions/checkout@v4 must come before the scripts")
        if junit is None:
            continue
        smoke = max(i for i, s, _ in calls if s == "scripts/ci_smoke.sh")
        uploads = [i for i, u in uses.items() if u == "actions/upload-artifact@v4"]
        good_upload = False
        for i in uploads:
            paths = str((steps[i].get("with") or {}).get("path", "")).split()
            if junit in [posixpath.normpath(p) for p in paths] and always(steps[i].get("if")) and i > smoke:
                good_upload = True
        if not good_upload:
            problems.append(f"{where}: no actions/upload-artifact@v4 step after ci_smoke.sh with if: always() "
                            f"and path {junit}")
        reports = [i for i, st in enumerate(steps) if isinstance(st, dict) and i > smoke and always(st.get("if"))
                   and isinstance(st.get("run"), str) and junit in st["run"]]
        if not reports:
            problems.append(f"{where}: no test-report step after ci_smoke.sh (if: always(), a run that reads {junit})")
    return problems


# ---- 2. GitLab CI -----------------------------------------------------------------------------

GITLAB_KEYWORDS = {"stages", "variables", "default", "include", "workflow", "image", "services", "before_script",
                   "after_script", "cache"}


def gitlab_jobs(doc):
    return {k: v for k, v in doc.items()
            if isinstance(k, str) and not k.startswith(".") and k not in GITLAB_KEYWORDS and isinstance(v, dict)}


def gitlab_problems(doc):
    if not isinstance(doc, dict):
        return ["the pipeline is not a mapping"]
    jobs = gitlab_jobs(doc)
    if not jobs:
        return ["no job"]
    problems = []
    for name, job in jobs.items():
        image = job.get("image")
        image = image.get("name") if isinstance(image, dict) else image
        if image != "debian:12":
            problems.append(f"{name}: image must be debian:12, not {image!r}")
        lines = []
        for key in ("before_script", "script"):
            part = job.get(key) or []
            lines += [part] if isinstance(part, str) else [x for x in part if isinstance(x, str)]
        calls = [(i, s, a) for i, line in enumerate(lines) for s, a in script_calls(line)]
        seq, junit = sequence_problems(calls, name)
        problems += seq
        artifacts = job.get("artifacts")
        if not isinstance(artifacts, dict):
            problems.append(f"{name}: no artifacts")
            continue
        if artifacts.get("when") != "always":
            problems.append(f"{name}: artifacts.when must be always")
        reported = (artifacts.get("reports") or {}).get("junit")
        reported = [reported] if isinstance(reported, str) else reported or []
        if junit is not None and junit not in [posixpath.normpath(str(p)) for p in reported]:
            problems.append(f"{name}: artifacts.reports.junit must name {junit} (what ci_smoke.sh writes), "
                            f"not {reported!r}")
    return problems


# ---- 3. .ci/run -------------------------------------------------------------------------------

def ci_run_problems(text):
    problems = []
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if "set -euo pipefail" not in lines:
        problems.append("no `set -euo pipefail` line")
    calls = [(i, s) for i, ln in enumerate(lines) for s, _ in script_calls(ln)]
    test_at = [i for i, ln in enumerate(lines) if any(w.lstrip("./") == "scripts/test.sh" for w in ln.split())]
    smoke_at = [i for i, s in calls if s == "scripts/ci_smoke.sh"]
    if not test_at:
        problems.append("does not call scripts/test.sh")
    if not smoke_at:
        problems.append("does not call scripts/ci_smoke.sh")
    if test_at and smoke_at and not test_at[0] < smoke_at[0]:
        problems.append("scripts/test.sh must run before scripts/ci_smoke.sh")
    if smoke_at and any(re.match(r"exec\b", ln) for ln in lines[:smoke_at[0]]):
        problems.append("an `exec` before scripts/ci_smoke.sh: the smoke step would never run")
    if "mktemp -d" not in text or not re.search(r"\btrap\b.*rm -rf", text):
        problems.append("the smoke step's folder must come from mktemp -d and be removed by a trap")
    return problems


# ---- 4. docs/ci.md ----------------------------------------------------------------------------

def doc_problems(args):
    text, files = args  # files: [(name, content)] in the order the doc shows them
    blocks = re.findall(r"^```yaml\n(.*?)^```$", text, re.M | re.S)
    if len(blocks) != len(files):
        return [f"{DOC}: expected {len(files)} ```yaml blocks ({', '.join(n for n, _ in files)}), found {len(blocks)}"]
    problems = []
    for block, (name, content) in zip(blocks, files):
        if block != content:
            diff = difflib.unified_diff(content.splitlines(), block.splitlines(), name, DOC, lineterm="", n=1)
            problems.append(f"{DOC}: its block differs from {name} (copy the file into the doc):\n    " +
                            "\n    ".join(diff))
    for target in (".github/workflows/bnlab.yml", ".gitlab-ci.yml"):
        if target not in text:
            problems.append(f"{DOC}: does not say to copy a recipe to {target}")
    return problems


# ---- 1. yamllint ------------------------------------------------------------------------------

YAMLLINT_CONFIG = os.path.join(SRC, "tests/ci/yamllint.yml")


def yamllint_problems(text):
    exe = shutil.which("yamllint")
    if exe is None:
        return ["yamllint is not installed (scripts/setup.sh installs it)"]
    p = subprocess.run([exe, "--strict", "-f", "parsable", "-c", YAMLLINT_CONFIG, "-"], input=text,
                       capture_output=True, text=True)
    return [] if p.returncode == 0 else (p.stdout + p.stderr).strip().splitlines() or [f"yamllint exit {p.returncode}"]


# ---- 5. JUnit ---------------------------------------------------------------------------------

def junit_problems(xml_text):
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        return [f"not XML: {e}"]
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite") if root.tag == "testsuites" else []
    if not suites:
        return [f"no testsuite (root element <{root.tag}>)"]
    problems = []
    for s in suites:
        if s.get("failures") != "0":
            problems.append(f"testsuite {s.get('name')!r}: failures={s.get('failures')!r}, expected \"0\"")
        if s.get("errors", "0") != "0":
            problems.append(f"testsuite {s.get('name')!r}: errors={s.get('errors')!r}")
    cases = root.iter("testcase")
    n = 0
    for c in cases:
        n += 1
        if c.find("failure") is not None or c.find("error") is not None:
            problems.append(f"testcase {c.get('name')!r} failed")
    if n == 0:
        problems.append("no testcase")
    return problems


# ---- the checks -------------------------------------------------------------------------------

gh_text, gl_text = read(GITHUB), read(GITLAB)
try:
    gh, gl = yaml.safe_load(gh_text), yaml.safe_load(gl_text)
except yaml.YAMLError as e:
    sys.exit(f"FAIL: a recipe under docs/ci/ is not valid YAML: {e}")

# 1
report(f"yamllint {GITHUB}", yamllint_problems(gh_text))
report(f"yamllint {GITLAB}", yamllint_problems(gl_text))
expect_rejected("YAML with a duplicate key (yamllint)", yamllint_problems, gh_text + "name: twice\n")
expect_rejected("YAML with a tab-indented line (yamllint)", yamllint_problems, gl_text + "x:\n\t- y\n")

# 2
report(f"structure of {GITHUB}", github_problems(gh))
report(f"structure of {GITLAB}", gitlab_problems(gl))
gh_junit, gl_junit = github_junit(gh), None
for job in gitlab_jobs(gl).values():
    gl_junit = gl_junit or next((smoke_junit(a) for line in job.get("script", []) if isinstance(line, str)
                                 for s, a in script_calls(line) if s == "scripts/ci_smoke.sh"), None)
report("both recipes publish the same JUnit file",
       [] if gh_junit and gh_junit == gl_junit else [f"GitHub: {gh_junit!r}, GitLab: {gl_junit!r}"])


def gh_mutant(change):
    doc = copy.deepcopy(gh)
    job = next(iter(doc["jobs"].values()))
    change(doc, job, job["steps"])
    return doc


def step_with(steps, needle):
    return next(i for i, s in enumerate(steps) if needle in str(s.get("run", "")) + str(s.get("uses", "")))


def drop_on(doc, job, steps):
    doc.pop("on", None)
    doc.pop(True, None)


def swap_setup_build(doc, job, steps):
    a, b = step_with(steps, "scripts/setup.sh"), step_with(steps, "scripts/build.sh")
    steps[a], steps[b] = steps[b], steps[a]


def upload(steps):
    return steps[step_with(steps, "actions/upload-artifact")]


def report_step(steps):
    return next(s for s in steps if "GITHUB_STEP_SUMMARY" in str(s.get("run", "")))


GH_MUTANTS = {
    "a workflow without `on:`": drop_on,
    "a container other than debian:12": lambda d, j, s: j.update(container="debian:11"),
    "a job without runs-on": lambda d, j, s: j.pop("runs-on"),
    "a workflow without scripts/setup.sh": lambda d, j, s: s.pop(step_with(s, "scripts/setup.sh")),
    "a workflow without scripts/build.sh": lambda d, j, s: s.pop(step_with(s, "scripts/build.sh")),
    "scripts/build.sh without bnlab_app": lambda d, j, s: s[step_with(s, "scripts/build.sh")].update(run="scripts/build.sh"),
    "a workflow without scripts/ci_smoke.sh": lambda d, j, s: s.pop(step_with(s, "scripts/ci_smoke.sh")),
    "build before setup": swap_setup_build,
    "an upload of another path": lambda d, j, s: upload(s)["with"].update(path="out/junit.xml"),
    "an upload without if: always()": lambda d, j, s: upload(s).pop("if"),
    "an old upload-artifact": lambda d, j, s: upload(s).update(uses="actions/upload-artifact@v3"),
    "a third-party action": lambda d, j, s: s.append({"uses": "dorny/test-reporter@v1"}),
    "no checkout": lambda d, j, s: s.pop(step_with(s, "actions/checkout")),
    "no test-report step": lambda d, j, s: s.remove(report_step(s)),
    "ci_smoke.sh writing elsewhere": lambda d, j, s: s[step_with(s, "scripts/ci_smoke.sh")].update(
        run="scripts/ci_smoke.sh elsewhere"),
}
for what, change in GH_MUTANTS.items():
    expect_rejected(what, github_problems, gh_mutant(change))


def gl_mutant(change):
    doc = copy.deepcopy(gl)
    job = next(iter(gitlab_jobs(doc).values()))
    change(job)
    return doc


def drop_line(job, needle):
    job["script"] = [x for x in job["script"] if needle not in x]


GL_MUTANTS = {
    "an image other than debian:12": lambda j: j.update(image="debian:11"),
    "a job without scripts/setup.sh": lambda j: drop_line(j, "scripts/setup.sh"),
    "a job without scripts/build.sh": lambda j: drop_line(j, "scripts/build.sh"),
    "a job without scripts/ci_smoke.sh": lambda j: drop_line(j, "scripts/ci_smoke.sh"),
    "a JUnit report at another path": lambda j: j["artifacts"]["reports"].update(junit="out/junit.xml"),
    "no JUnit report": lambda j: j["artifacts"].pop("reports"),
    "artifacts only on success": lambda j: j["artifacts"].update(when="on_success"),
    "script in the wrong order": lambda j: j["script"].reverse(),
}
for what, change in GL_MUTANTS.items():
    expect_rejected(what, gitlab_problems, gl_mutant(change))

# 3
ci_run = read(CI_RUN)
report(f"{CI_RUN} runs scripts/test.sh, then scripts/ci_smoke.sh", ci_run_problems(ci_run))
expect_rejected(f"{CI_RUN} without ci_smoke.sh",
                ci_run_problems, "\n".join(ln for ln in ci_run.splitlines() if "ci_smoke.sh" not in ln))
expect_rejected(f"{CI_RUN} without test.sh",
                ci_run_problems, "\n".join(ln for ln in ci_run.splitlines() if "scripts/test.sh" not in ln))
expect_rejected(f"{CI_RUN} with `exec scripts/test.sh`", ci_run_problems,
                re.sub(r"^(\s*)(\./)?scripts/test\.sh", r"\1exec scripts/test.sh", ci_run, count=1, flags=re.M))
expect_rejected(f"{CI_RUN} without set -euo pipefail", ci_run_problems, ci_run.replace("set -euo pipefail", ""))

# 4
doc = read(DOC)
files = [(GITHUB, gh_text), (GITLAB, gl_text)]
report(f"{DOC} shows both recipes byte for byte", doc_problems((doc, files)))
at = doc.find("```yaml\n") + len("```yaml\n") + 2  # a byte inside the first block
expect_rejected(f"{DOC} with a changed byte in a block", doc_problems,
                (doc[:at] + ("x" if doc[at] != "x" else "y") + doc[at + 1:], files))
expect_rejected(f"{DOC} without the GitLab block", doc_problems,
                (re.sub(r"```yaml\n(?:(?!```).)*?bnlab-smoke:.*?```\n", "", doc, flags=re.S), files))

# the scripts the recipes call directly must be executable (in git's index when tracked)
problems = []
for rel in SCRIPTS:
    path = os.path.join(SRC, rel)
    mode = None
    try:
        staged = subprocess.run(["git", "-C", SRC, "ls-files", "-s", "--", rel], capture_output=True, text=True)
        if staged.returncode == 0 and staged.stdout.strip():
            mode = staged.stdout.split()[0]
    except OSError:
        pass
    if mode is not None and mode != "100755":
        problems.append(f"{rel}: git records mode {mode}, not 100755")
    if not os.stat(path).st_mode & stat.S_IXUSR:
        problems.append(f"{rel}: not executable")
smoke_text = read(SMOKE)
if "set -euo pipefail" not in smoke_text:
    problems.append(f"{SMOKE}: no set -euo pipefail")
setup = dict(re.findall(r"^(\w+)=\((.*?)^\)", read("scripts/setup.sh"), re.M | re.S))
for pkg in ("python3-yaml", "yamllint"):
    if pkg not in setup.get("test_packages", "").split():
        problems.append(f"scripts/setup.sh does not install {pkg} for the test suite")
# The recipes' `setup.sh --build` installs what the build needs: protoc and every -dev package.
for pkg in ("protobuf-compiler", "libprotobuf-dev", "libtorch-dev", "libgtest-dev"):
    if pkg not in setup.get("build_packages", "").split():
        problems.append(f"scripts/setup.sh --build does not install {pkg}")
report("the scripts the recipes call are executable; setup.sh installs what this test needs", problems)

# 5
expect_rejected("JUnit XML with a failure", junit_problems,
                '<testsuites><testsuite name="x" tests="1" failures="1"><testcase name="a"><failure/></testcase>'
                '</testsuite></testsuites>')
expect_rejected("JUnit XML without a testcase", junit_problems,
                '<testsuites><testsuite name="x" tests="0" failures="0"></testsuite></testsuites>')
expect_rejected("text that is not XML", junit_problems, "not xml")

env = {k: v for k, v in os.environ.items() if k not in ("BNLAB_CI_CONFIG", "BNLAB_CI_GOLDEN")}
env["BNLAB_BUILD_DIR"] = BUILD
smoke = os.path.join(SRC, SMOKE)


def run_smoke(cwd, args, **extra):
    p = subprocess.run([smoke] + args, cwd=cwd, env={**env, **extra}, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def tail(output):
    return "output:\n    " + "\n    ".join(output.strip().splitlines()[-8:])


def junit_at(path):
    if not os.path.isfile(path):
        return [f"{path}: not written"]
    with open(path, encoding="utf-8") as f:
        return junit_problems(f.read())


with tempfile.TemporaryDirectory() as tmp:
    default_junit = os.path.join(tmp, "ci-out", "junit.xml")
    rc, out = run_smoke(tmp, [])
    report("ci_smoke.sh (default OUT_DIR ci-out) passes and writes ci-out/junit.xml",
           ([f"exit {rc}; " + tail(out)] if rc else []) + junit_at(default_junit))

    recipe_out = posixpath.dirname(gh_junit or "ci-out/junit.xml")
    rc, out = run_smoke(tmp, [recipe_out])
    report(f"ci_smoke.sh {recipe_out} as the recipes call it (a rerun when that is ci-out) writes {gh_junit}",
           ([f"exit {rc}; " + tail(out)] if rc else []) + junit_at(os.path.join(tmp, gh_junit or "")))

    # the GitHub report step, run as GitHub would (bash -e -o pipefail), on the file just written
    step = next((s for j in gh["jobs"].values() for s in j["steps"] if "GITHUB_STEP_SUMMARY" in str(s.get("run", ""))),
                None)
    problems = ["no step writes $GITHUB_STEP_SUMMARY"] if step is None else []
    if step is not None:
        summary = os.path.join(tmp, "summary.md")
        p = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=tmp,
                           env={**env, "GITHUB_STEP_SUMMARY": summary}, capture_output=True, text=True)
        cases = len(list(ET.parse(os.path.join(tmp, gh_junit)).getroot().iter("testcase")))
        text = open(summary).read() if os.path.exists(summary) else ""
        if p.returncode != 0:
            problems.append(f"exit {p.returncode}: {p.stderr.strip()}")
        if f"{cases} of {cases} test cases passed" not in text:
            problems.append(f"the summary does not say {cases} of {cases} test cases passed: {text!r}")
    report("the GitHub test-report step summarises the JUnit file", problems)

    # a mismatch: the check fails, ci_smoke.sh exits 1, the JUnit file says so
    rc, out = run_smoke(tmp, ["mismatch"], BNLAB_CI_GOLDEN=os.path.join(SRC, "tests/golden/smoke_keras_nll.json"))
    mismatch_junit = junit_at(os.path.join(tmp, "mismatch", "junit.xml"))
    report("ci_smoke.sh with a golden that does not match exits 1 and its JUnit file shows failures",
           ([] if rc == 1 else [f"exit {rc}, expected 1; " + tail(out)]) +
           ([] if any("failures=" in p for p in mismatch_junit) else [f"JUnit problems: {mismatch_junit}"]))

    # stubs of bnlab that fail `check` or `run`: the exit status goes through, a stale junit.xml of
    # bnlab's is removed before the run, and a failed run never reaches the check
    stub = os.path.join(tmp, "stub")
    os.makedirs(os.path.join(stub, "bin"))
    log = os.path.join(tmp, "stub.log")
    with open(os.path.join(stub, "bin", "bnlab"), "w") as f:
        f.write(f'#!/bin/bash\necho "$1" >> {shlex.quote(log)}\n'
                f'[ "$1" = "$STUB_FAIL" ] && exit "$STUB_CODE"\nexec {shlex.quote(BIN)} "$@"\n')
    os.chmod(os.path.join(stub, "bin", "bnlab"), 0o755)
    stale = os.path.join(tmp, "mismatch", "junit.xml")  # a junit.xml bnlab wrote, from an earlier check
    shutil.copyfile(stale, default_junit)
    rc, out = run_smoke(tmp, ["ci-out"], BNLAB_BUILD_DIR=stub, STUB_FAIL="check", STUB_CODE="1")
    report("ci_smoke.sh exits non-zero when `bnlab check` fails, leaving no stale junit.xml",
           ([] if rc == 1 else [f"exit {rc}; " + tail(out)]) +
           (["the junit.xml of an earlier check is still there"] if os.path.exists(default_junit) else []))
    open(log, "w").close()
    shutil.copyfile(stale, default_junit)
    rc, out = run_smoke(tmp, ["ci-out"], BNLAB_BUILD_DIR=stub, STUB_FAIL="run", STUB_CODE="3")
    problems = [] if rc == 3 else [f"exit {rc}, expected 3; " + tail(out)]
    if os.path.exists(default_junit):
        problems.append("the junit.xml of the previous run is still there")
    if open(log).read().split() != ["run"]:
        problems.append(f"bnlab was called as {open(log).read().split()}, expected run only")
    report("ci_smoke.sh exits non-zero when `bnlab run` fails, leaving no stale junit.xml", problems)

    # a junit.xml bnlab did not write: left alone, and ci_smoke.sh fails
    foreign = os.path.join(tmp, "foreign")
    os.makedirs(foreign)
    with open(os.path.join(foreign, "junit.xml"), "w") as f:
        f.write("<testsuites><!-- mine --></testsuites>\n")
    rc, out = run_smoke(tmp, ["foreign"])
    kept = open(os.path.join(foreign, "junit.xml")).read() == "<testsuites><!-- mine --></testsuites>\n"
    report("ci_smoke.sh leaves a junit.xml bnlab did not write alone and fails",
           ([] if rc != 0 else ["exit 0"]) + ([] if kept else ["the file was changed or removed"]))

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
