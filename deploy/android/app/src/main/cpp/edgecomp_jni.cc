// JNI wrapper around edgecomp::Model for org.edgecomp.EdgecompModel (one float input, one
// float output; extend Run for more). Errors become java.lang.RuntimeException with the
// one-line message of edgecomp::Error.
#include <jni.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "edgecomp_model.h"

namespace {

std::string ToString(JNIEnv* env, jstring s) {
  const char* chars = env->GetStringUTFChars(s, nullptr);
  std::string out(chars);
  env->ReleaseStringUTFChars(s, chars);
  return out;
}

void Throw(JNIEnv* env, const std::string& message) {
  env->ThrowNew(env->FindClass("java/lang/RuntimeException"), message.c_str());
}

}  // namespace

extern "C" JNIEXPORT jlong JNICALL Java_org_edgecomp_EdgecompModel_nativeLoad(
    JNIEnv* env, jclass, jstring dir, jint threads, jstring runtime_record) {
  try {
    auto* model = new edgecomp::Model(ToString(env, dir), threads, ToString(env, runtime_record));
    return reinterpret_cast<jlong>(model);
  } catch (const std::exception& err) {
    Throw(env, err.what());
    return 0;
  }
}

extern "C" JNIEXPORT jfloatArray JNICALL Java_org_edgecomp_EdgecompModel_nativeRun(
    JNIEnv* env, jclass, jlong handle, jfloatArray input) {
  auto* model = reinterpret_cast<edgecomp::Model*>(handle);
  try {
    tvm::ffi::Tensor x = edgecomp::Model::Empty(model->inputs().at(0));
    size_t bytes = edgecomp::Model::Bytes(x);
    if (static_cast<size_t>(env->GetArrayLength(input)) * sizeof(float) != bytes) {
      throw edgecomp::Error("input " + model->inputs()[0].name + " needs " +
                            std::to_string(bytes / sizeof(float)) + " floats");
    }
    env->GetFloatArrayRegion(input, 0, env->GetArrayLength(input),
                             static_cast<jfloat*>(x.data_ptr()));
    std::vector<tvm::ffi::Tensor> y = model->Run({x});
    jsize n = static_cast<jsize>(edgecomp::Model::Bytes(y[0]) / sizeof(float));
    jfloatArray out = env->NewFloatArray(n);
    env->SetFloatArrayRegion(out, 0, n, static_cast<const jfloat*>(y[0].data_ptr()));
    return out;
  } catch (const std::exception& err) {
    Throw(env, err.what());
    return nullptr;
  }
}

extern "C" JNIEXPORT void JNICALL Java_org_edgecomp_EdgecompModel_nativeFree(JNIEnv*, jclass,
                                                                             jlong handle) {
  delete reinterpret_cast<edgecomp::Model*>(handle);
}
