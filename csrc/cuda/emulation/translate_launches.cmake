# Rewrites the kernel launches of a .cu file, `kernel<<<grid, block, shared, stream>>>(args);`, into the emulator's
# `::mtlfast::emulation::launch(&kernel, grid, block, shared, stream)(args);` so that the host compiler can build
# the file unchanged otherwise. Usage: cmake -DINPUT=<file.cu> -DOUTPUT=<file.cpp> -P translate_launches.cmake
file(READ "${INPUT}" _source)
# The kernel: an identifier with optional template arguments right before <<<; the configuration: everything up
# to the >>> of the same statement.
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_]*(<[^<>;]*>)?)<<<([^;]*)>>>"
       "::mtlfast::emulation::launch(&\\1, \\3)" _translated "${_source}")
string(FIND "${_translated}" "<<<" _left)
if(NOT _left EQUAL -1)
  message(FATAL_ERROR "translate_launches: a kernel launch of ${INPUT} was not translated")
endif()
file(WRITE "${OUTPUT}" "// Generated from ${INPUT} by translate_launches.cmake for the CUDA emulation build.\n#line 1 \"${INPUT}\"\n${_translated}")
