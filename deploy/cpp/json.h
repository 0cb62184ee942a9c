// A small JSON reader, enough for edgecomp's manifest.json and the kit's lib/runtime.json:
// objects, arrays, strings (with escapes), numbers, true, false, null. Throws std::runtime_error.
#ifndef EDGECOMP_JSON_H_
#define EDGECOMP_JSON_H_

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgecomp {

struct Json {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = kNull;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> items;        // array elements, or object values
  std::vector<std::string> keys;  // object keys, parallel to items

  bool Has(const std::string& key) const { return Find(key) != nullptr; }

  const Json* Find(const std::string& key) const {
    if (kind != kObject) return nullptr;
    for (size_t i = 0; i < keys.size(); ++i) {
      if (keys[i] == key) return &items[i];
    }
    return nullptr;
  }

  // The member `key` of an object; throws naming the key when it is absent.
  const Json& operator[](const std::string& key) const {
    const Json* found = Find(key);
    if (found == nullptr) throw std::runtime_error("no \"" + key + "\" entry");
    return *found;
  }

  const std::string& Str() const {
    if (kind != kString) throw std::runtime_error("a JSON string was expected");
    return string;
  }

  long long Int() const {
    if (kind != kNumber) throw std::runtime_error("a JSON number was expected");
    return static_cast<long long>(number);
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}

  Json Parse() {
    Json value = Value();
    Space();
    if (pos_ != s_.size()) Fail("trailing characters");
    return value;
  }

 private:
  [[noreturn]] void Fail(const std::string& what) {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(pos_) + ": " + what);
  }

  void Space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' ||
                                s_[pos_] == '\t')) {
      ++pos_;
    }
  }

  bool Eat(char c) {
    Space();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  void Expect(char c) {
    if (!Eat(c)) Fail(std::string("expected '") + c + "'");
  }

  bool Word(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(pos_, n, word) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  Json Value() {
    Space();
    if (pos_ >= s_.size()) Fail("unexpected end");
    Json v;
    char c = s_[pos_];
    if (c == '{') {
      ++pos_;
      v.kind = Json::kObject;
      if (Eat('}')) return v;
      do {
        Space();
        v.keys.push_back(String());
        Expect(':');
        v.items.push_back(Value());
      } while (Eat(','));
      Expect('}');
    } else if (c == '[') {
      ++pos_;
      v.kind = Json::kArray;
      if (Eat(']')) return v;
      do {
        v.items.push_back(Value());
      } while (Eat(','));
      Expect(']');
    } else if (c == '"') {
      v.kind = Json::kString;
      v.string = String();
    } else if (Word("true")) {
      v.kind = Json::kBool;
      v.boolean = true;
    } else if (Word("false")) {
      v.kind = Json::kBool;
    } else if (Word("null")) {
      v.kind = Json::kNull;
    } else {
      const char* start = s_.c_str() + pos_;
      char* end = nullptr;
      v.number = std::strtod(start, &end);
      if (end == start) Fail("unexpected character");
      v.kind = Json::kNumber;
      pos_ += static_cast<size_t>(end - start);
    }
    return v;
  }

  std::string String() {
    if (pos_ >= s_.size() || s_[pos_] != '"') Fail("expected a string");
    ++pos_;
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) Fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) Fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          if (pos_ + 4 > s_.size()) Fail("short \\u escape");
          unsigned code = static_cast<unsigned>(std::stoul(s_.substr(pos_, 4), nullptr, 16));
          pos_ += 4;
          // UTF-8 of a BMP code point (surrogate pairs are not needed for manifests).
          if (code < 0x80) {
            out += static_cast<char>(code);
          } else if (code < 0x800) {
            out += static_cast<char>(0xc0 | (code >> 6));
            out += static_cast<char>(0x80 | (code & 0x3f));
          } else {
            out += static_cast<char>(0xe0 | (code >> 12));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
            out += static_cast<char>(0x80 | (code & 0x3f));
          }
          break;
        }
        default: out += e;  // \" \\ \/
      }
    }
  }

  std::string s_;
  size_t pos_ = 0;
};

// Parse a JSON file; throws std::runtime_error naming the file.
inline Json ReadJsonFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream text;
  text << in.rdbuf();
  try {
    return JsonParser(text.str()).Parse();
  } catch (const std::runtime_error& err) {
    throw std::runtime_error(path + ": " + err.what());
  }
}

}  // namespace edgecomp

#endif  // EDGECOMP_JSON_H_
