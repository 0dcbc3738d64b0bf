# slowed_add_program(<name> <sources>...): an executable of this build (test, example or
# benchmark) linked to slowed that reuses the shared precompiled torch header.
function(slowed_add_program name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE slowed)
  target_precompile_headers(${name} REUSE_FROM slowed_pch)
  # torch ships fmt 12 headers on its include path; use them header-only so that no second
  # fmt (e.g. Debian's libfmt-dev) can be linked against them.
  target_compile_definitions(${name} PRIVATE FMT_HEADER_ONLY)
endfunction()
