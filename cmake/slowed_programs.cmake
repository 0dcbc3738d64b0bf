# slowed_add_program(<name> <sources>...): an executable of this build (test, example or
# benchmark) linked to slowed with this build's settings (slowed_build_settings, top-level
# CMakeLists.txt), reusing the shared precompiled torch header.
function(slowed_add_program name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE slowed_build_settings slowed)
  target_precompile_headers(${name} REUSE_FROM slowed_pch)
endfunction()
