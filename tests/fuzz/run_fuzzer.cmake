# ctest driver of one fuzz target: a fresh working corpus (new inputs go there, never into the
# committed seeds), the seeds, a fixed seed so that a CI run is reproducible, and the caps.
# A crash, leak, sanitizer report, timeout or allocation above the cap fails the test, and the
# input is left in WORK/artifacts/ (libFuzzer prints its path).
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK}/corpus ${WORK}/artifacts ${WORK}/tmp)
set(ENV{TMPDIR} ${WORK}/tmp)
execute_process(
  COMMAND ${FUZZER} -runs=${RUNS} -seed=1 -max_len=${MAX_LEN} -timeout=30
          -malloc_limit_mb=${MALLOC_LIMIT_MB} -rss_limit_mb=${RSS_LIMIT_MB}
          -detect_leaks=1 -print_final_stats=1 -artifact_prefix=${WORK}/artifacts/
          ${WORK}/corpus ${SEEDS}
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${FUZZER} failed (exit ${rc}); the input is in ${WORK}/artifacts/")
endif()
