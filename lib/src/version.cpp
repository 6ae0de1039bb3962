// Build identity: version from CMake, commit from the header regenerated at every build.
#include "version.hpp"

#include "bnlab_git.h"

namespace bnlab {
const char* bnlab_version() { return BNLAB_VERSION; }
const char* git_commit() { return BNLAB_GIT_COMMIT; }
}  // namespace bnlab
