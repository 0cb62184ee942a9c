// edgecomp_run: run an edgecomp model folder natively, without Python.
//
//   edgecomp_run MODEL_DIR --input NAME=FILE.npy [--input ...] [-o OUT_DIR]
//                [--repeat N] [--threads N]
//
// Checks the model folder (checksums, architecture) and the TVM runtime version before loading
// anything (see edgecomp_model.h), reads every input from a .npy file and checks its name,
// shape and dtype against manifest.json, runs the model, writes each output to
// OUT_DIR/NAME.npy, and with --repeat N prints the latency (median, min, max over N runs).
// --threads N sets the runtime's thread pool size (TVM_NUM_THREADS) before it starts.
// Errors: one line "edgecomp_run: error: ..." on stderr, exit status 1.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "edgecomp_model.h"
#include "npy.h"

namespace {

const char* kUsage =
    "usage: edgecomp_run MODEL_DIR --input NAME=FILE.npy [--input ...] [-o OUT_DIR]"
    " [--repeat N] [--threads N]\n";

struct Args {
  std::string model;
  std::map<std::string, std::string> inputs;
  std::string output_dir;
  int repeat = 0;
  int threads = 0;
};

int ParseCount(const std::string& flag, const char* value) {
  char* end = nullptr;
  long n = std::strtol(value, &end, 10);
  if (*value == '\0' || *end != '\0' || n < 0) {
    throw edgecomp::Error(flag + " takes a count, not '" + value + "'");
  }
  return static_cast<int>(n);
}

Args Parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) throw edgecomp::Error(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--input") {
      std::string item = value();
      size_t eq = item.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == item.size()) {
        throw edgecomp::Error("--input " + item + " does not parse: write NAME=FILE.npy");
      }
      args.inputs[item.substr(0, eq)] = item.substr(eq + 1);
    } else if (a == "-o" || a == "--output") {
      args.output_dir = value();
    } else if (a == "--repeat") {
      args.repeat = ParseCount(a, value());
    } else if (a == "--threads") {
      args.threads = ParseCount(a, value());
    } else if (!a.empty() && a[0] == '-') {
      throw edgecomp::Error("unknown option " + a + "; " + kUsage);
    } else if (args.model.empty()) {
      args.model = a;
    } else {
      throw edgecomp::Error("one model folder only (got " + args.model + " and " + a + ")");
    }
  }
  if (args.model.empty()) throw edgecomp::Error(std::string("no model folder; ") + kUsage);
  return args;
}

std::vector<tvm::ffi::Tensor> ReadInputs(const edgecomp::Model& model, const Args& args) {
  for (const auto& kv : args.inputs) {
    bool known = false;
    for (const auto& spec : model.inputs()) known = known || spec.name == kv.first;
    if (!known) {
      std::string names;
      for (const auto& spec : model.inputs()) names += (names.empty() ? "" : ", ") + spec.name;
      throw edgecomp::Error("--input " + kv.first + ": the model has no such input; its inputs: " +
                            names);
    }
  }
  std::vector<tvm::ffi::Tensor> tensors;
  for (const auto& spec : model.inputs()) {
    auto given = args.inputs.find(spec.name);
    if (given == args.inputs.end()) {
      throw edgecomp::Error("input " + spec.name + " is not given: pass --input " + spec.name +
                            "=FILE.npy (" + edgecomp::ShapeString(spec.shape) + " " + spec.dtype +
                            ")");
    }
    edgecomp::NpyArray array;
    try {
      array = edgecomp::ReadNpy(given->second);
    } catch (const std::runtime_error& err) {
      throw edgecomp::Error("--input " + spec.name + ": " + err.what());
    }
    if (array.shape != spec.shape || array.dtype != spec.dtype) {
      throw edgecomp::Error("--input " + spec.name + "=" + given->second + " is " +
                            edgecomp::ShapeString(array.shape) + " " + array.dtype +
                            "; the model wants " + edgecomp::ShapeString(spec.shape) + " " +
                            spec.dtype);
    }
    tvm::ffi::Tensor t = edgecomp::Model::Empty(spec);
    std::memcpy(t.data_ptr(), array.data.data(), array.data.size());
    tensors.push_back(t);
  }
  return tensors;
}

int Main(int argc, char** argv) {
  Args args = Parse(argc, argv);
  edgecomp::Model model(args.model, args.threads);
  std::vector<tvm::ffi::Tensor> inputs = ReadInputs(model, args);
  std::vector<tvm::ffi::Tensor> outputs = model.Run(inputs);
  for (size_t i = 0; i < outputs.size(); ++i) {
    const edgecomp::TensorSpec& spec = model.outputs()[i];
    const tvm::ffi::Tensor& out = outputs[i];
    std::vector<int64_t> shape(out.shape().begin(), out.shape().end());
    std::printf("%s: shape %s %s", spec.name.c_str(), edgecomp::ShapeString(shape).c_str(),
                edgecomp::DtypeName(out.dtype()).c_str());
    if (!args.output_dir.empty()) {
      std::string path = args.output_dir + "/" + spec.name + ".npy";
      edgecomp::WriteNpy(path, edgecomp::DtypeName(out.dtype()), shape, out.data_ptr(),
                         edgecomp::Model::Bytes(out));
      std::printf(" -> %s", path.c_str());
    }
    std::printf("\n");
    std::fflush(stdout);
  }
  if (args.repeat > 0) {
    std::vector<double> ms;
    for (int r = 0; r < args.repeat; ++r) {
      auto start = std::chrono::steady_clock::now();
      model.Run(inputs);
      auto stop = std::chrono::steady_clock::now();
      ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    }
    std::sort(ms.begin(), ms.end());
    size_t n = ms.size();
    double median = n % 2 ? ms[n / 2] : (ms[n / 2 - 1] + ms[n / 2]) / 2;
    std::printf("latency: median %.3f ms, min %.3f ms, max %.3f ms over %d runs\n", median,
                ms.front(), ms.back(), args.repeat);
  }
  return 0;
}

void Fail(const std::string& message) {
  std::string line = message.substr(0, message.find('\n'));  // one line, always
  std::fprintf(stderr, "edgecomp_run: error: %s\n", line.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const edgecomp::Error& err) {
    Fail(err.what());
  } catch (const tvm::ffi::Error& err) {
    Fail("TVM: " + err.message());
  } catch (const std::exception& err) {
    Fail(err.what());
  }
  return 1;
}
