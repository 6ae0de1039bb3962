// Build identity, kept in one small translation unit so a new commit recompiles only it.
#pragma once

namespace bnlab {
const char* bnlab_version();
const char* git_commit();
}  // namespace bnlab
