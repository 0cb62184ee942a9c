// edgecomp::Model: load an edgecomp model folder (model.so + manifest.json [+ weights.params])
// with TVM's runtime and call it, from C++ only (no Python). Header-only; include it in your
// app and link libtvm_ffi.so from the kit's lib/ (libtvm_runtime.so is loaded from the same
// folder at run time, after its version was checked).
//
//   edgecomp::Model model("model", /*threads=*/4);   // checks, then loads; throws edgecomp::Error
//   tvm::ffi::Tensor x = edgecomp::Model::Empty(model.inputs()[0]);
//   std::memcpy(x.data_ptr(), pixels, edgecomp::Model::Bytes(x));
//   std::vector<tvm::ffi::Tensor> y = model.Run({x});  // outputs, in manifest order
//
// Before anything is loaded, the constructor checks, each failure an edgecomp::Error with a
// one-line message saying what to do:
//   - every file listed in manifest.json is there and matches its SHA-256;
//   - model.so was linked for this machine's architecture;
//   - the TVM runtime beside libtvm_ffi.so is the version the model was compiled with
//     (lib/runtime.json, written by `edgecomp package`, with the libraries' checksums).
#ifndef EDGECOMP_MODEL_H_
#define EDGECOMP_MODEL_H_

#include <dlfcn.h>
#include <tvm/ffi/c_api.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"
#include "sha256.h"

namespace edgecomp {

// What every check and load failure throws; what() is one line saying what to do.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TensorSpec {
  std::string name;
  std::string dtype;  // numpy name: float32 ...
  std::vector<int64_t> shape;
};

inline std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

// The ELF architecture this program was compiled for (the names edgecomp's manifests use).
inline const char* ThisArch() {
#if defined(__aarch64__)
  return "aarch64";
#elif defined(__arm__)
  return "arm";
#elif defined(__x86_64__)
  return "x86_64";
#else
  return "unknown";
#endif
}

// The architecture of an ELF file, from its header.
inline std::string ElfArch(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  unsigned char head[20] = {0};
  if (!in.read(reinterpret_cast<char*>(head), 20) || std::memcmp(head, "\x7f" "ELF", 4) != 0) {
    return "not an ELF file";
  }
  int machine = head[18] | (head[19] << 8);
  if (machine == 62 && head[4] == 2) return "x86_64";
  if (machine == 183 && head[4] == 2) return "aarch64";
  if (machine == 40 && head[4] == 1) return "arm";
  return "e_machine " + std::to_string(machine);
}

inline DLDataType ParseDtype(const std::string& name) {
  struct Entry { const char* name; uint8_t code; uint8_t bits; };
  static const Entry kTypes[] = {
      {"float32", kDLFloat, 32}, {"float64", kDLFloat, 64}, {"float16", kDLFloat, 16},
      {"int8", kDLInt, 8},       {"int16", kDLInt, 16},     {"int32", kDLInt, 32},
      {"int64", kDLInt, 64},     {"uint8", kDLUInt, 8},     {"uint16", kDLUInt, 16},
      {"uint32", kDLUInt, 32},   {"uint64", kDLUInt, 64},   {"bool", kDLBool, 8}};
  for (const Entry& e : kTypes) {
    if (name == e.name) return DLDataType{e.code, e.bits, 1};
  }
  throw Error("dtype " + name + " is not supported by edgecomp's runner");
}

inline std::string DtypeName(DLDataType t) {
  std::string kind = t.code == kDLFloat ? "float" : t.code == kDLInt ? "int"
                     : t.code == kDLUInt ? "uint" : t.code == kDLBool ? "bool" : "?";
  return kind == "bool" ? kind : kind + std::to_string(t.bits);
}

class Model {
 public:
  // Check the model folder and the runtime, then load model.so and its weights.
  // threads > 0 sets TVM_NUM_THREADS (the runtime's pool size) before the runtime starts.
  // runtime_record: the kit's lib/runtime.json; default: the one beside libtvm_ffi.so (an
  // Android app, whose libraries live in the APK's native library folder, passes its own).
  explicit Model(const std::string& dir, int threads = 0, const std::string& runtime_record = "")
      : dir_(Folder(dir)),
        manifest_(CheckAndLoadRuntime(dir_, threads, runtime_record)),
        library_(Load(dir_)),
        vm_(Initialize(library_, dir_)),
        main_(vm_->GetFunction(manifest_["entry"].Str()).value()) {
    for (const Json& spec : manifest_["inputs"].items) inputs_.push_back(Spec(spec));
    for (const Json& spec : manifest_["outputs"].items) outputs_.push_back(Spec(spec));
    LoadWeights();
  }

  const std::vector<TensorSpec>& inputs() const { return inputs_; }
  const std::vector<TensorSpec>& outputs() const { return outputs_; }
  const Json& manifest() const { return manifest_; }
  size_t num_weights() const { return weights_.size(); }

  // Run the model once. Inputs must have the manifest's shapes and dtypes (CPU tensors).
  std::vector<tvm::ffi::Tensor> Run(const std::vector<tvm::ffi::Tensor>& inputs) {
    if (inputs.size() != inputs_.size()) {
      throw Error("the model takes " + std::to_string(inputs_.size()) + " inputs, not " +
                  std::to_string(inputs.size()));
    }
    std::vector<tvm::ffi::AnyView> args;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const TensorSpec& spec = inputs_[i];
      std::vector<int64_t> shape(inputs[i].shape().begin(), inputs[i].shape().end());
      std::string dtype = DtypeName(inputs[i].dtype());
      if (shape != spec.shape || dtype != spec.dtype) {
        throw Error("input " + spec.name + " is " + ShapeString(shape) + " " + dtype +
                    "; the model wants " + ShapeString(spec.shape) + " " + spec.dtype);
      }
      args.push_back(inputs[i]);
    }
    for (const tvm::ffi::Tensor& w : weights_) args.push_back(w);  // --weights external
    tvm::ffi::Any result;
    main_.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    std::vector<tvm::ffi::Tensor> outputs;
    if (auto tensor = result.as<tvm::ffi::Tensor>()) {
      outputs.push_back(*tensor);
    } else {
      for (const tvm::ffi::Any& item : result.cast<tvm::ffi::Array<tvm::ffi::Any>>()) {
        outputs.push_back(item.cast<tvm::ffi::Tensor>());
      }
    }
    return outputs;
  }

  // A CPU tensor of the spec's shape and dtype, 64-byte aligned, uninitialised.
  static tvm::ffi::Tensor Empty(const TensorSpec& spec) {
    return tvm::ffi::Tensor::FromNDAlloc(AlignedAlloc(), tvm::ffi::ShapeView(spec.shape.data(), spec.shape.size()),
                                         ParseDtype(spec.dtype), DLDevice{kDLCPU, 0});
  }

  static size_t Bytes(const tvm::ffi::Tensor& t) {
    return tvm::ffi::GetDataSize(static_cast<size_t>(t.numel()), t.dtype());
  }

 private:
  struct AlignedAlloc {
    void AllocData(DLTensor* t) {
      size_t bytes = tvm::ffi::GetDataSize(*t);
      t->data = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
      if (t->data == nullptr) throw Error("out of memory allocating a tensor");
    }
    void FreeData(DLTensor* t) { std::free(t->data); }
  };

  static std::string Folder(const std::string& dir) {
    std::string out = dir.empty() ? "." : dir;
    if (out[0] != '/') {  // dlopen needs a path, not a bare name: make it absolute
      char* cwd = realpath(".", nullptr);
      if (cwd != nullptr) {
        out = std::string(cwd) + "/" + out;
        std::free(cwd);
      }
    }
    return out.back() == '/' ? out : out + "/";
  }

  static TensorSpec Spec(const Json& j) {
    TensorSpec spec{j["name"].Str(), j["dtype"].Str(), {}};
    for (const Json& d : j["shape"].items) spec.shape.push_back(d.Int());
    return spec;
  }

  static bool IsFile(const std::string& path) { return std::ifstream(path).good(); }

  static std::string Dirname(const std::string& path) {
    size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
  }

  // Every check that needs no TVM; then the runtime libraries, checked and loaded.
  static Json CheckAndLoadRuntime(const std::string& dir, int threads,
                                  const std::string& runtime_record) {
    if (threads > 0) setenv("TVM_NUM_THREADS", std::to_string(threads).c_str(), 1);
    if (!IsFile(dir + "manifest.json")) {
      throw Error(dir + " is not an edgecomp model folder (no manifest.json)");
    }
    Json manifest;
    try {
      manifest = ReadJsonFile(dir + "manifest.json");
      for (const char* key : {"files", "inputs", "outputs", "entry", "tvm", "arch"}) manifest[key];
    } catch (const std::runtime_error& err) {
      throw Error(dir + "manifest.json is not an edgecomp manifest: " + err.what());
    }
    const Json& files = manifest["files"];
    for (const std::string& name : files.keys) {
      if (!IsFile(dir + name)) {
        throw Error(dir + name + " is missing: copy the whole model folder of the kit");
      }
    }
    std::string arch = ElfArch(dir + "model.so");
    if (arch != ThisArch()) {
      throw Error(dir + "model.so was built for " + arch + " (board " +
                  manifest["board"].Str() + ") but this program runs on " + ThisArch() +
                  ": use the kit made for this machine's board (edgecomp package)");
    }
    for (size_t i = 0; i < files.keys.size(); ++i) {
      if (Sha256File(dir + files.keys[i]) != files.items[i]["sha256"].Str()) {
        throw Error(dir + files.keys[i] +
                    " does not match its checksum in manifest.json: the model folder was"
                    " altered; take it from the kit again");
      }
    }
    LoadRuntime(manifest, runtime_record);
    return manifest;
  }

  // The runtime beside the libtvm_ffi.so this process uses must be the one the model was
  // compiled with: lib/runtime.json names its version and the libraries' checksums.
  static void LoadRuntime(const Json& manifest, const std::string& runtime_record) {
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&TVMFFIGetVersion), &info) == 0) {
      throw Error("cannot locate libtvm_ffi.so in this process");
    }
    std::string lib = Dirname(info.dli_fname);
    std::string record = runtime_record.empty() ? lib + "/runtime.json" : runtime_record;
    if (!IsFile(record)) {
      throw Error("no runtime.json beside " + std::string(info.dli_fname) +
                  ": use the lib/ folder of an edgecomp kit (edgecomp package)");
    }
    Json runtime;
    try {
      runtime = ReadJsonFile(record);
      runtime["tvm"].Str();
      runtime["tvm_ffi_abi"].Str();
      runtime["load"];
      runtime["files"];
    } catch (const std::runtime_error& err) {
      throw Error(record + " is not an edgecomp runtime record: " + err.what());
    }
    const std::string& wanted = manifest["tvm"].Str();
    if (runtime["tvm"].Str() != wanted) {
      throw Error("the model was compiled with TVM " + wanted + " but the runtime in " + lib +
                  " is TVM " + runtime["tvm"].Str() +
                  ": use the runtime of the model's own kit, or compile the model again");
    }
    TVMFFIVersion v;
    TVMFFIGetVersion(&v);
    std::string abi = std::to_string(v.major) + "." + std::to_string(v.minor) + "." +
                      std::to_string(v.patch);
    if (abi != runtime["tvm_ffi_abi"].Str()) {
      throw Error(std::string(info.dli_fname) + " is tvm-ffi " + abi + " but the kit's runtime" +
                  " needs " + runtime["tvm_ffi_abi"].Str() + ": copy the kit's lib/ folder again");
    }
    const Json& files = runtime["files"];
    for (size_t i = 0; i < files.keys.size(); ++i) {
      std::string path = lib + "/" + files.keys[i];
      if (!IsFile(path)) {
        throw Error("the TVM runtime library " + path +
                    " is missing: copy the kit's whole lib/ folder");
      }
      if (Sha256File(path) != files.items[i]["sha256"].Str()) {
        throw Error(path + " is not the TVM " + wanted +
                    " runtime library the kit was made with (checksum differs): copy the"
                    " kit's lib/ folder again");
      }
    }
    for (const Json& name : runtime["load"].items) {  // libtvm_runtime.so [, _extra]
      std::string path = lib + "/" + name.Str();
      if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
        throw Error("cannot load the TVM runtime " + path + ": " + dlerror());
      }
    }
  }

  static tvm::ffi::Module Load(const std::string& dir) {
    try {
      return tvm::ffi::Module::LoadFromFile(dir + "model.so");
    } catch (const tvm::ffi::Error& err) {
      throw Error("TVM could not load " + dir + "model.so: " + FirstLine(err.message()));
    }
  }

  static tvm::ffi::Module Initialize(const tvm::ffi::Module& library, const std::string& dir) {
    auto load = library->GetFunction("vm_load_executable");
    if (!load.has_value()) throw Error(dir + "model.so is not a Relax VM library");
    tvm::ffi::Module vm = (*load)().cast<tvm::ffi::Module>();
    // (device type, device id, allocator): CPU 0, pooled allocator.
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    return vm;
  }

  void LoadWeights() {
    const Json* weights = manifest_.Find("weights");
    const Json* file = weights != nullptr ? weights->Find("file") : nullptr;
    if (file == nullptr || file->kind != Json::kString) return;  // embedded in model.so
    auto load = tvm::ffi::Function::GetGlobal("runtime.LoadParamsFromFile");
    if (!load.has_value()) throw Error("this TVM runtime cannot read .params files");
    auto params = (*load)(dir_ + file->Str()).cast<tvm::ffi::Map<tvm::ffi::String, tvm::ffi::Tensor>>();
    std::vector<std::string> names;
    for (const auto& kv : params) names.push_back(std::string(kv.first));
    std::sort(names.begin(), names.end());  // main's parameter order (p0000, p0001 ...)
    for (const std::string& name : names) weights_.push_back(params.at(name));
  }

  static std::string FirstLine(const std::string& text) {
    size_t end = text.find('\n');
    return end == std::string::npos ? text : text.substr(0, end);
  }

  std::string dir_;
  Json manifest_;
  tvm::ffi::Module library_;
  tvm::ffi::Module vm_;  // keeps the executable alive while outputs are used
  tvm::ffi::Function main_;
  std::vector<TensorSpec> inputs_, outputs_;
  std::vector<tvm::ffi::Tensor> weights_;
};

}  // namespace edgecomp

#endif  // EDGECOMP_MODEL_H_
