# Locate the installed torch through the Python interpreter and describe it as an INTERFACE target `torch_ext`.
# find_package(Torch) is not used: on a CUDA build of torch it insists on a CUDA toolkit (and cuDNN/nvrtc paths),
# so a machine with a CUDA torch but no nvcc could not build even the CPU kernels.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__); print(torch.version.cuda or ''); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_status
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_status EQUAL 0)
  message(FATAL_ERROR "fourbit: could not import torch with ${Python_EXECUTABLE}; install torch first "
                      "(and build with --no-build-isolation to build against it)")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_DIR)
list(GET _torch_info 1 TORCH_VERSION)
list(GET _torch_info 2 TORCH_CUDA_VERSION)
list(GET _torch_info 3 TORCH_CXX11_ABI)
message(STATUS "fourbit: torch ${TORCH_VERSION} at ${TORCH_DIR} (CUDA '${TORCH_CUDA_VERSION}')")

add_library(torch_ext INTERFACE)
target_include_directories(torch_ext SYSTEM INTERFACE "${TORCH_DIR}/include"
                                                      "${TORCH_DIR}/include/torch/csrc/api/include")
target_compile_definitions(torch_ext INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})
foreach(_lib c10 torch_cpu torch)
  find_library(TORCH_${_lib}_LIBRARY ${_lib} PATHS "${TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(torch_ext INTERFACE "${TORCH_${_lib}_LIBRARY}")
endforeach()
