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

# The data folder for the tests: SLOWED_DATA_DIR, else ../shared/data (mirrored into the cache
# when its copy there is missing or differs, checked against scripts/data.sha256), else that
# cached copy, so that a clone at another path (CI's clean clone) still runs the data tests.
data_dir="${SLOWED_DATA_DIR:-}"
if [[ -z "$data_dir" ]]; then
  shared_data="$root/../shared/data"
  cached_data="$cache_dir/data"
  data_ok() { [[ -d "$1/bbh" ]] && (cd "$1" && sha256sum --quiet -c "$root/scripts/data.sha256" >/dev/null 2>&1); }
  if [[ -d "$shared_data/bbh" ]]; then
    # CMake's default already points there (data_dir stays empty: no -D, so no rebuild).
    if ! data_ok "$cached_data" && data_ok "$shared_data"; then
      rm -rf "$cached_data.tmp" && cp -a "$shared_data/." "$cached_data.tmp" &&
        rm -rf "$cached_data" && mv "$cached_data.tmp" "$cached_data"
    fi
  elif data_ok "$cached_data"; then
    data_dir="$cached_data"
  fi
fi

# slowed_configure_and_build [build targets...]
slowed_configure_and_build() {
  cmake -S "$root" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE="${SLOWED_BUILD_TYPE:-Release}" \
    -DCMAKE_PREFIX_PATH="$torch_cmake" \
    -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
    -DSLOWED_PYTHON="${SLOWED_VENV:-$cache_dir/venv}/bin/python" \
    -DSLOWED_MODELS_DIR="$cache_dir/models" \
    ${data_dir:+-DSLOWED_DATA_DIR="$data_dir"} >/dev/null
  local targets=()
  (($#)) && targets=(--target "$@")
  cmake --build "$build" -j "$jobs" "${targets[@]}"
}
