#!/bin/sh
# Build the Android sample app (arm64-v8a) of an edgecomp kit: run it from the kit's android/.
#   ANDROID_NDK_HOME (or ANDROID_NDK)  the Android NDK (r26 or newer)
#   TVM_ANDROID_RUNTIME                a folder with libtvm_runtime.so and libtvm_ffi.so built
#                                      with that NDK for arm64-v8a (recipe: README.md here)
#   TVM_ANDROID_RUNTIME_VERSION        the TVM version it was built from (default: the model's)
# plus Gradle 8.7+ and the Android SDK (ANDROID_HOME) for the app itself.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
kit=${EDGECOMP_KIT:-$(dirname "$here")}
fail() { echo "build.sh: error: $*" >&2; exit 1; }

ndk=${ANDROID_NDK_HOME:-${ANDROID_NDK:-}}
[ -n "$ndk" ] && [ -d "$ndk" ] ||
  fail "set ANDROID_NDK_HOME (or ANDROID_NDK) to an Android NDK (r26 or newer)"
rt=${TVM_ANDROID_RUNTIME:-}
[ -n "$rt" ] && [ -f "$rt/libtvm_runtime.so" ] && [ -f "$rt/libtvm_ffi.so" ] ||
  fail "set TVM_ANDROID_RUNTIME to a folder with libtvm_runtime.so and libtvm_ffi.so built with the NDK for arm64-v8a (recipe: $here/README.md)"
[ -f "$kit/model/manifest.json" ] || fail "no model in $kit/model: run build.sh from an edgecomp kit"
command -v gradle >/dev/null 2>&1 || fail "install Gradle 8.7+ and the Android SDK (set ANDROID_HOME)"

# The runtime and the STL it was built with go into the APK.
jni=$here/app/src/main/jniLibs/arm64-v8a
mkdir -p "$jni"
cp "$rt/libtvm_runtime.so" "$rt/libtvm_ffi.so" "$jni/"
stl=$(find "$ndk/toolchains/llvm/prebuilt" -path "*aarch64-linux-android/libc++_shared.so" | head -n 1)
[ -n "$stl" ] || fail "no libc++_shared.so for aarch64 in $ndk"
cp "$stl" "$jni/"

# The model folder and the runtime's record (version, checksums) as assets.
assets=$here/app/src/main/assets
rm -rf "$assets/model"
mkdir -p "$assets"
cp -r "$kit/model" "$assets/model"
version=${TVM_ANDROID_RUNTIME_VERSION:-$(sed -n 's/^ *"tvm": "\(.*\)",$/\1/p' "$kit/model/manifest.json" | head -n 1)}
abi=$(for p in MAJOR MINOR PATCH; do sed -n "s/^#define TVM_FFI_VERSION_$p \([0-9]*\).*/\1/p" "$kit/include/tvm/ffi/c_api.h"; done | paste -sd.)
sum() { sha256sum "$1" | cut -d' ' -f1; }
cat > "$assets/runtime.json" <<JSON
{"tvm": "$version", "tvm_ffi_abi": "$abi", "arch": "aarch64", "source": "$rt",
 "load": ["libtvm_runtime.so"],
 "files": {"libtvm_runtime.so": {"sha256": "$(sum "$rt/libtvm_runtime.so")"},
           "libtvm_ffi.so": {"sha256": "$(sum "$rt/libtvm_ffi.so")"}}}
JSON

ANDROID_NDK_HOME=$ndk gradle -p "$here" assembleDebug \
  -PtvmAndroidRuntime="$rt" -PedgecompKit="$kit"
echo "APK: $here/app/build/outputs/apk/debug/app-debug.apk"
