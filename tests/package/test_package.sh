#!/usr/bin/env bash
# The Debian package: CPack builds bnlab's .deb from the build tree, its dependencies are
# Debian's runtime packages (no -dev), `cmake --install` lays out bin/ and share/, dpkg -i
# installs it on this machine, the installed bnlab reports its version and runs a smoke config
# from /usr/share/bnlab, and dpkg -r removes it again (also when a check fails: trap).
# Refuses to run, failing, where a bnlab package or a /usr/bin/bnlab is there already: it never
# replaces or removes what it did not install.
# Usage: test_package.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build="$1"; src="$2"
tmp="$(mktemp -d)"
installed=0
cleanup() {
  if [ "$installed" = 1 ]; then dpkg --purge bnlab >/dev/null 2>&1 || echo "FAIL: dpkg --purge bnlab did not remove the package" >&2; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; echo "0 passed, 1 failed"; exit 1; }
passed=0
ok() { passed=$((passed + 1)); }

[ "$(id -u)" -eq 0 ] || fail "dpkg -i needs root (CI and the developers' machines run as root)"
status="$(dpkg-query -W -f='${Status}' bnlab 2>/dev/null || true)"
case "$status" in
  ""|"unknown ok not-installed"|"deinstall ok not-installed"|"purge ok not-installed") ;;
  *) fail "dpkg knows a bnlab package already ($status); this test installs and removes its own, so remove that one first (dpkg --purge bnlab)" ;;
esac
for p in /usr/bin/bnlab /usr/share/bnlab /usr/share/doc/bnlab; do
  [ ! -e "$p" ] || fail "$p exists and is not from a bnlab package; dpkg -i would overwrite it and dpkg -r remove it"
done

# cmake --install into a staging prefix: the layout.
cmake --install "$build" --prefix "$tmp/stage" >/dev/null
for f in bin/bnlab share/bnlab/configs/seed_repro.json share/bnlab/configs/smoke/keras_nll.json share/bnlab/data/fair.csv \
         share/doc/bnlab/README.md share/doc/bnlab/ci.md share/doc/bnlab/config.md; do
  [ -f "$tmp/stage/$f" ] || fail "cmake --install did not lay out $f"
  ok
done

# The package.
(cd "$tmp" && cpack --config "$build/CPackConfig.cmake" -B "$tmp/pkg" >"$tmp/cpack.log" 2>&1) || { cat "$tmp/cpack.log" >&2; fail "cpack failed"; }
deb="$(ls "$tmp"/pkg/*.deb)"
[ "$(echo "$deb" | wc -l)" -eq 1 ] || fail "cpack made no .deb or several: $deb"
depends="$(dpkg-deb -f "$deb" Depends)"
echo "Depends: $depends"
grep -q "libtorch" <<<"$depends" || fail "Depends names no LibTorch runtime package: $depends"
grep -q "libprotobuf" <<<"$depends" || fail "Depends names no libprotobuf runtime package: $depends"
if tr ',' '\n' <<<"$depends" | grep -- "-dev" >/dev/null; then fail "Depends names a -dev package: $depends"; fi
ok
[ "$(dpkg-deb -f "$deb" Package)" = bnlab ] || fail "the package is not named bnlab"
contents="$(dpkg-deb -c "$deb")"  # whole, so that grep -q closing early cannot break a pipe
grep -q "\./usr/bin/bnlab$" <<<"$contents" || fail "the package has no /usr/bin/bnlab"
grep -q "\./usr/share/bnlab/configs/smoke/keras_nll.json$" <<<"$contents" || fail "the package has no configs"
grep -q "\./usr/share/doc/bnlab/README.md$" <<<"$contents" || fail "the package has no docs"
ok

# Install, use from the installed location, remove.
installed=1
dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log" >&2; fail "dpkg -i failed"; }
want="$("$build/bin/bnlab" --version)"
got="$(/usr/bin/bnlab --version)"
[ "$got" = "$want" ] || fail "installed bnlab --version says '$got', the build's '$want'"
ok
(cd "$tmp" && /usr/bin/bnlab run /usr/share/bnlab/configs/smoke/keras_nll.json --out "$tmp/run" --verbose 0 --no-plots)
for f in summary.csv report.html manifest.json; do
  [ -s "$tmp/run/$f" ] || fail "the installed bnlab wrote no $f"
done
ok
# The installed config runs to the same curves as the source tree's.
"$build/bin/bnlab" run "$src/configs/smoke/keras_nll.json" --out "$tmp/run_src" --verbose 0 --no-plots
cmp -s "$tmp/run/curves.csv" "$tmp/run_src/curves.csv" || fail "the installed bnlab's curves differ from the build's"
ok
dpkg --purge bnlab >/dev/null
installed=0
if [ "$(dpkg-query -W -f='${Status}' bnlab 2>/dev/null || true)" = "install ok installed" ]; then fail "dpkg -r left bnlab installed"; fi
for p in /usr/bin/bnlab /usr/share/bnlab /usr/share/doc/bnlab; do [ ! -e "$p" ] || fail "dpkg -r left $p"; done
ok
echo "package: $(basename "$deb"), $(stat -c %s "$deb") bytes, installed, run and removed"
echo "$passed passed, 0 failed"
