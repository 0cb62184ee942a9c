// .npy files (NumPy format v1-v3, C order, little-endian) read into and written from plain
// byte buffers. Throws std::runtime_error with a message naming the file.
#ifndef EDGECOMP_NPY_H_
#define EDGECOMP_NPY_H_

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgecomp {

struct NpyArray {
  std::string dtype;           // numpy name: float32, int64, uint8 ...
  std::vector<int64_t> shape;
  std::vector<char> data;      // C order, little-endian
};

// numpy dtype name <-> .npy descr ('<f4'), and element size.
inline bool NpyDescr(const std::string& dtype, std::string* descr, size_t* bytes) {
  static const struct { const char* name; const char* descr; size_t bytes; } kTypes[] = {
      {"float32", "<f4", 4}, {"float64", "<f8", 8}, {"float16", "<f2", 2},
      {"int8", "|i1", 1},    {"uint8", "|u1", 1},   {"int16", "<i2", 2},
      {"uint16", "<u2", 2},  {"int32", "<i4", 4},   {"uint32", "<u4", 4},
      {"int64", "<i8", 8},   {"uint64", "<u8", 8},  {"bool", "|b1", 1}};
  for (const auto& t : kTypes) {
    if (dtype == t.name) {
      if (descr != nullptr) *descr = t.descr;
      if (bytes != nullptr) *bytes = t.bytes;
      return true;
    }
  }
  return false;
}

inline std::string NpyDtypeOfDescr(std::string descr) {
  if (descr.size() == 3 && descr[0] == '=') descr[0] = '<';
  static const char* kNames[] = {"float32", "float64", "float16", "int8",   "uint8",  "int16",
                                 "uint16",  "int32",   "uint32",  "int64",  "uint64", "bool"};
  for (const char* name : kNames) {
    std::string d;
    NpyDescr(name, &d, nullptr);
    if (d == descr || (d[0] == '|' && descr.size() == 3 && descr.substr(1) == d.substr(1))) {
      return name;
    }
  }
  return "";
}

inline int64_t NpyNumel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The value of 'key' in the header dict, as written by numpy: "'key': VALUE, ".
inline std::string NpyHeaderField(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  at = header.find(':', at);
  if (at == std::string::npos) return "";
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  if (at < header.size() && header[at] == '(') return header.substr(at, header.find(')', at) - at + 1);
  size_t end = header.find_first_of(",}", at);
  return header.substr(at, end - at);
}

inline NpyArray ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    throw std::runtime_error(path + " is not a .npy file");
  }
  uint32_t header_len = 0;
  unsigned char len[4] = {0, 0, 0, 0};
  in.read(reinterpret_cast<char*>(len), magic[6] == 1 ? 2 : 4);
  header_len = len[0] | (len[1] << 8) | (len[2] << 16) | (uint32_t(len[3]) << 24);
  std::string header(header_len, '\0');
  if (!in.read(&header[0], header_len)) throw std::runtime_error(path + ": truncated header");
  NpyArray out;
  std::string descr = NpyHeaderField(header, "descr");
  if (descr.size() >= 2) descr = descr.substr(1, descr.size() - 2);  // strip the quotes
  out.dtype = NpyDtypeOfDescr(descr);
  if (out.dtype.empty()) {
    throw std::runtime_error(path + ": dtype '" + descr +
                             "' is not supported (little-endian numbers only)");
  }
  if (NpyHeaderField(header, "fortran_order") != "False") {
    throw std::runtime_error(path + " is in Fortran order: save it with np.ascontiguousarray");
  }
  std::string shape = NpyHeaderField(header, "shape");
  std::stringstream dims(shape.substr(1, shape.size() - 2));
  std::string dim;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(' ') != std::string::npos) out.shape.push_back(std::stoll(dim));
  }
  size_t bytes = 0;
  NpyDescr(out.dtype, nullptr, &bytes);
  out.data.resize(static_cast<size_t>(NpyNumel(out.shape)) * bytes);
  if (!in.read(out.data.data(), static_cast<std::streamsize>(out.data.size()))) {
    throw std::runtime_error(path + ": truncated data");
  }
  return out;
}

// Write a .npy v1.0 file (header padded to 64 bytes, as numpy does).
inline void WriteNpy(const std::string& path, const std::string& dtype,
                     const std::vector<int64_t>& shape, const void* data, size_t nbytes) {
  std::string descr;
  if (!NpyDescr(dtype, &descr, nullptr)) throw std::runtime_error("cannot write dtype " + dtype);
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ", ";
  if (shape.size() > 1) dims.resize(dims.size() - 2);
  if (shape.size() == 1) dims.resize(dims.size() - 1);
  std::string header =
      "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  out.write("\x93NUMPY\x01\x00", 8);
  unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                          static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<char*>(len), 2);
  out << header;
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace edgecomp

#endif  // EDGECOMP_NPY_H_
