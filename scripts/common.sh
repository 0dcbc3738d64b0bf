# Sourced by scripts/test and scripts/run: runs setup, then configures and builds into $build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_dir="${SLOWED_CACHE_DIR:-$HOME/.cache/slowed}"
build="${SLOWED_BUILD_DIR:-$root/build}"
jobs="${SLOWED_JOBS:-$(nproc)}"

"$root/scripts/setup"
torch_cmake="$(cat "$cache_dir/torch_cmake_prefix")"
# OpenMP threads that spin while waiting make a busy small machine 10-20x slower; passive
# waiting costs nothing measurable on an idle one.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export CCACHE_DIR="${CCACHE_DIR:-$cache_dir/ccache}"
# Paths under the checkout hash relative to it, so clones and worktrees at other paths share hits.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"
export CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-1}"
# PCH and ccache work together only when ccache may ignore the PCH's timestamp.
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"

# slowed_configure_and_build [build targets...]
slowed_configure_and_build() {
  cmake -S "$root" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE="${SLOWED_BUILD_TYPE:-Release}" \
    -DCMAKE_PREFIX_PATH="$torch_cmake" \
    -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
    -DSLOWED_PYTHON="${SLOWED_VENV:-$cache_dir/venv}/bin/python" \
    -DSLOWED_MODELS_DIR="$cache_dir/models" >/dev/null
  local targets=()
  (($#)) && targets=(--target "$@")
  cmake --build "$build" -j "$jobs" "${targets[@]}"
}
