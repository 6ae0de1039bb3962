# Warnings for bnlab's own code only: an INTERFACE target linked by our targets, never by third parties.
add_library(bnlab_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(bnlab_warnings INTERFACE -Wall -Wextra -Wpedantic -Wshadow=local -Wno-unused-parameter)
endif()
