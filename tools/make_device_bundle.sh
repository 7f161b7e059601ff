#!/bin/bash
# Build what a bare GPU machine (Python 3.12, torch preinstalled, no network, no espeak-ng)
# needs to run privasr: .devbundle/ (espeak-ng + bible + their shared libraries, espeak-ng
# data, Devil's Dictionary, setup.sh) and .whl/ (wheels for py3.12). ~33 MB; both ignored by git
# via .git/info/exclude. On the GPU machine: `source .devbundle/setup.sh` from the repo root.
# Not included: wordfreq (a 56 MB wheel; the carry limit is 64 MiB) -- make audit canaries here
# (`privasr audit make-canaries`) and carry their folder instead.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.devbundle/' .git/info/exclude || echo /.devbundle/ >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
rm -rf .devbundle && mkdir -p .devbundle/{bin,real,lib,usr_lib,dictd} .whl
cp "$(command -v espeak-ng)" "$(command -v bible)" .devbundle/real/
cp /usr/lib/bible.data* .devbundle/usr_lib/
cp /usr/share/dictd/devil.* .devbundle/dictd/
cp -r /usr/lib/x86_64-linux-gnu/espeak-ng-data .devbundle/
libs=$(for b in .devbundle/real/*; do ldd "$b"; done | awk '/=>/{print $3}' | sort -u)
libs2=$(for l in $libs; do ldd "$l"; done | awk '/=>/{print $3}' | sort -u)
for l in $libs $libs2; do
  case "$(basename "$l")" in libc.so*|libm.so*|ld-linux*|libpthread*|libdl.so*|librt.so*) ;;
    *) cp -L "$l" .devbundle/lib/ ;; esac
done
for b in espeak-ng bible; do   # wrappers: the carried libraries for these binaries only
  printf '#!/bin/sh\nd=$(dirname "$(readlink -f "$0")")/..\nLD_LIBRARY_PATH="$d/lib" exec "$d/real/%s" "$@"\n' "$b" > ".devbundle/bin/$b"
  chmod +x ".devbundle/bin/$b"
done
cat > .devbundle/setup.sh <<'SETUP'
# source from the repo root on the GPU machine
B=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH="$B/bin:$PATH"
cp -r "$B/espeak-ng-data" /usr/lib/x86_64-linux-gnu/ 2>/dev/null || true
cp "$B"/usr_lib/bible.data* /usr/lib/
mkdir -p /usr/share/dictd && cp "$B"/dictd/devil.* /usr/share/dictd/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$B"/../.whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
SETUP
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64"
for p in kaldi-native-fbank==1.23.0 soundfile==0.14.0 dp-accounting==0.6.0 opacus==1.6.0 \
         jiwer==4.0.0 cffi pycparser dm-tree==0.1.9 rapidfuzz; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $plat --platform any -d .whl "$p"
done
du -sh .devbundle .whl
