# One helper so every target that includes torch precompiles it the same way.
function(bnlab_torch_pch target)
  if(BNLAB_USE_PCH)
    target_precompile_headers(${target} PRIVATE <torch/torch.h> <nlohmann/json.hpp>)
  endif()
endfunction()
