// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// A small, header-only reader and writer for NumPy's `.npy` format, for moebal-inspect.
/// Standard library only.
///
/// `read_npy` reads format versions 1.0, 2.0 and 3.0 with the dtypes
///   float16 / float32 / float64   ('<f2' '>f2' '<f4' '>f4' '<f8' '>f8'),
///   bool                          ('|b1'),
///   int8/16/32/64, uint8/16/32/64 ('|i1' '<i2' '>i4' '<u8' ...),
/// little- or big-endian ('|' and '=' mean the host's order), C or Fortran order, any rank
/// including 0-d. Every element is converted to double (bool -> 0/1; 64-bit integers above
/// 2^53 round to the nearest double) and returned in C (row-major) order: Fortran data is
/// transposed. Bytes after the data are ignored, as numpy ignores them.
///
/// `write_npy` writes '<f8', C order, version 1.0 (2.0 only if the header would not fit in
/// 65535 bytes, as numpy does), with the header laid out exactly as numpy 1.24's `np.save`
/// lays it out: the same dict text, the same spare spaces, padded with spaces and a final
/// '\n' so the data starts at a multiple of 64 bytes. It writes a temporary file next to
/// `path` ("<path>.tmp-<random hex>") and renames it over `path` only once it is complete,
/// so a failure never leaves a partial or a stray file. (Rename semantics are POSIX: an
/// existing `path` is replaced atomically. No fsync is done.)
///
/// Every problem throws `NpyError`, whose what() is one line "<path>: <problem>" (text
/// taken from the file is escaped and shortened). The problems:
///   cannot open: <strerror>                         fopen failed (missing, no permission)
///   cannot read: <strerror>                         read error (e.g. the path is a directory)
///   not an .npy file (bad magic)                    fewer than 6 bytes, or not "\x93NUMPY"
///   truncated preamble: file ends after <n> bytes   magic fine, version or length cut off
///   unsupported .npy version <major>.<minor>        anything but 1.0, 2.0, 3.0
///   truncated header: expected <n> bytes, got <m>   header shorter than its length field
///   malformed header: <detail>                      see below
///   unsupported dtype '<descr>'                     complex, strings, objects, '<f16', ...
///   unsupported structured dtype <descr list>       descr is a list (record dtype)
///   negative dimension in shape (<shape>)
///   size overflow: dimension <digits> is too large  a dimension does not fit in int64
///   size overflow: shape (<shape>) has too many elements
///                                                   elements * 8 bytes exceed 2^63 - 1
///   truncated data: expected <n> bytes, got <m>     data section shorter than the shape says
/// Malformed-header details (the header is the Python dict literal numpy writes; keys in any
/// order, any whitespace, ' or " quotes, optional trailing comma, Python-2 'L' suffixes):
///   expected '{', found <what>              expected a quoted key, found <what>
///   expected ':', found <what>              expected ',' or '}', found <what>
///   unterminated string                     unexpected key '<key>'
///   duplicate key '<key>'                   missing key 'descr' | 'fortran_order' | 'shape'
///   'descr' must be a string, found <what>  'fortran_order' must be True or False, found <what>
///   'shape' must be a tuple of integers, found <what>    (also for "(5)": <what> is
///                                           "a parenthesized integer")
///   unexpected <what> after '}'             unterminated list in 'descr'
/// where <what> is the offending character, quoted ('x', '\x00'), or "end of header".
/// `write_npy` problems:
///   cannot write: <strerror>                cannot create, write, close or rename the file
///   cannot write: negative dimension in shape (<shape>)
///   cannot write: size overflow: shape (<shape>) has too many elements
///   cannot write: null data pointer for <n> elements

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _MSC_VER
#pragma warning(push)
#pragma warning(disable : 4996)  // fopen / strerror are not "deprecated" here
#endif

namespace moebal_inspect {

/// Thrown for every problem; what() is one line: "<path>: <problem>".
class NpyError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An array read from an .npy file.
struct NpyArray {
  std::vector<std::int64_t> shape;  ///< as in the file ({} for a 0-d array)
  std::vector<double> data;         ///< every element as double, in C (row-major) order
  std::string dtype;                ///< the descr string as in the file, e.g. "<f4"
  bool fortran_order = false;       ///< as in the file (data is C order regardless)
};

namespace npy_detail {

[[noreturn]] inline void fail(const std::string& path, const std::string& problem) {
  throw NpyError(path + ": " + problem);
}

inline std::string errno_text(int error) {
  if (error == 0) return "unknown I/O error";
  return std::strerror(error);
}

/// Text from the file, made safe for a one-line message: non-printable bytes as \xNN,
/// at most `limit` bytes kept (then "...").
inline std::string printable(const std::string& text, std::size_t limit = 80) {
  static const char hex[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (i == limit) {
      out += "...";
      break;
    }
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte >= 0x20 && byte < 0x7f) {
      out += static_cast<char>(byte);
    } else {
      out += "\\x";
      out += hex[byte >> 4];
      out += hex[byte & 0xf];
    }
  }
  return out;
}

/// Python's repr of a tuple of ints: "()", "(5,)", "(2, 3)".
inline std::string shape_repr(const std::vector<std::int64_t>& shape) {
  std::string out = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  if (shape.size() == 1) out += ",";
  return out + ")";
}

/// Largest byte count we handle: fits both std::int64_t and std::size_t.
inline std::uint64_t max_bytes() {
  return std::min<std::uint64_t>(
      static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
      static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max()));
}

/// Number of elements of `shape` into `count`; `negative` for a dimension < 0, `overflow`
/// when elements * 8 bytes (their size as doubles) exceed max_bytes(). Any 0 dimension gives
/// 0 elements, whatever the others.
enum class ShapeCheck { ok, negative, overflow };
inline ShapeCheck element_count(const std::vector<std::int64_t>& shape, std::uint64_t& count) {
  bool zero = false;
  for (std::int64_t d : shape) {
    if (d < 0) return ShapeCheck::negative;
    if (d == 0) zero = true;
  }
  count = 1;
  if (zero) {
    count = 0;
    return ShapeCheck::ok;
  }
  const std::uint64_t limit = max_bytes() / sizeof(double);
  for (std::int64_t d : shape) {
    const auto u = static_cast<std::uint64_t>(d);
    if (count > limit / u) return ShapeCheck::overflow;
    count *= u;
  }
  return ShapeCheck::ok;
}

struct FileCloser {
  void operator()(std::FILE* file) const noexcept { std::fclose(file); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

/// Appends up to `n` bytes from `file` to `out`; returns how many were read (< n only at
/// end of file). Grows `out` a chunk at a time, so a length field claiming far more than
/// the file holds costs at most one extra chunk of memory.
inline std::uint64_t read_up_to(std::FILE* file, const std::string& path, std::uint64_t n,
                                std::vector<unsigned char>& out) {
  constexpr std::uint64_t chunk = std::uint64_t{1} << 20;
  std::uint64_t got = 0;
  while (got < n) {
    const auto step = static_cast<std::size_t>(std::min(n - got, chunk));
    const std::size_t old_size = out.size();
    out.resize(old_size + step);
    errno = 0;
    const std::size_t r = std::fread(out.data() + old_size, 1, step, file);
    const int error = errno;
    out.resize(old_size + r);
    got += r;
    if (r < step) {
      if (std::ferror(file)) fail(path, "cannot read: " + errno_text(error));
      break;
    }
  }
  return got;
}

inline std::uint64_t load_le(const unsigned char* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | p[i];
  return v;
}

inline std::uint64_t load_be(const unsigned char* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v = (v << 8) | p[i];
  return v;
}

inline bool host_is_big_endian() {
  const std::uint16_t probe = 0x0102;
  unsigned char first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 0x01;
}

inline double double_from_bits(std::uint64_t bits) {
  double v = 0.0;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

/// IEEE 754 binary16 -> double, exact (NaN payloads kept, as numpy's conversion does).
inline double half_to_double(std::uint16_t h) {
  const bool negative = (h & 0x8000u) != 0;
  const unsigned exponent = (h >> 10) & 0x1fu;
  const unsigned mantissa = h & 0x3ffu;
  if (exponent == 0x1f) {
    const std::uint64_t bits = (negative ? (std::uint64_t{1} << 63) : 0) |
                               0x7ff0000000000000ull | (std::uint64_t{mantissa} << 42);
    return double_from_bits(bits);
  }
  const double magnitude =
      exponent == 0 ? std::ldexp(static_cast<double>(mantissa), -24)  // zero, subnormal
                    : std::ldexp(static_cast<double>(mantissa | 0x400u),
                                 static_cast<int>(exponent) - 25);
  return negative ? -magnitude : magnitude;
}

enum class Kind { float_, bool_, int_, uint_ };

struct Dtype {
  Kind kind = Kind::float_;
  std::size_t size = 0;
  bool big_endian = false;
};

/// Parses a descr string such as "<f4"; returns false when unsupported.
inline bool parse_descr(const std::string& descr, Dtype& out) {
  if (descr.size() < 3 || descr.size() > 4) return false;
  const char order = descr[0];
  if (order == '<') {
    out.big_endian = false;
  } else if (order == '>') {
    out.big_endian = true;
  } else if (order == '|' || order == '=') {
    out.big_endian = host_is_big_endian();
  } else {
    return false;
  }
  const std::string size = descr.substr(2);
  if (size == "1") {
    out.size = 1;
  } else if (size == "2") {
    out.size = 2;
  } else if (size == "4") {
    out.size = 4;
  } else if (size == "8") {
    out.size = 8;
  } else {
    return false;
  }
  switch (descr[1]) {
    case 'f':
      out.kind = Kind::float_;
      return out.size >= 2;
    case 'b':
      out.kind = Kind::bool_;
      return out.size == 1;
    case 'i':
      out.kind = Kind::int_;
      return true;
    case 'u':
      out.kind = Kind::uint_;
      return true;
    default:
      return false;
  }
}

inline double decode(const unsigned char* p, const Dtype& dtype) {
  const std::uint64_t bits = dtype.big_endian ? load_be(p, dtype.size) : load_le(p, dtype.size);
  switch (dtype.kind) {
    case Kind::float_:
      if (dtype.size == 2) return half_to_double(static_cast<std::uint16_t>(bits));
      if (dtype.size == 4) {
        const auto bits32 = static_cast<std::uint32_t>(bits);
        float f = 0.0f;
        std::memcpy(&f, &bits32, sizeof f);
        return static_cast<double>(f);
      }
      return double_from_bits(bits);
    case Kind::bool_:
      return bits != 0 ? 1.0 : 0.0;
    case Kind::int_: {
      std::uint64_t extended = bits;
      const unsigned width = static_cast<unsigned>(dtype.size * 8);
      if (width < 64 && ((bits >> (width - 1)) & 1u) != 0) extended |= ~std::uint64_t{0} << width;
      std::int64_t value = 0;
      std::memcpy(&value, &extended, sizeof value);  // two's complement by definition
      return static_cast<double>(value);
    }
    case Kind::uint_:
      return static_cast<double>(bits);
  }
  return 0.0;
}

/// The header: the Python dict literal numpy writes.
struct Header {
  std::string descr;
  bool structured = false;  ///< descr was a list (its raw text is in `descr`)
  bool fortran_order = false;
  std::vector<std::int64_t> shape;
};

class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path) : text_(text), path_(path) {}

  Header parse() {
    Header header;
    bool have_descr = false, have_fortran = false, have_shape = false;
    skip_space();
    expect('{');
    skip_space();
    while (!at('}')) {
      if (!at('\'') && !at('"')) malformed("expected a quoted key, found " + found());
      const std::string key = parse_string();
      skip_space();
      expect(':');
      skip_space();
      if (key == "descr") {
        check_duplicate(have_descr, key);
        parse_descr_value(header);
      } else if (key == "fortran_order") {
        check_duplicate(have_fortran, key);
        header.fortran_order = parse_bool();
      } else if (key == "shape") {
        check_duplicate(have_shape, key);
        header.shape = parse_shape();
      } else {
        malformed("unexpected key '" + printable(key) + "'");
      }
      skip_space();
      if (at(',')) {
        ++pos_;
        skip_space();
      } else if (!at('}')) {
        malformed("expected ',' or '}', found " + found());
      }
    }
    ++pos_;  // '}'
    skip_space();
    if (pos_ < text_.size()) malformed("unexpected " + found() + " after '}'");
    if (!have_descr) malformed("missing key 'descr'");
    if (!have_fortran) malformed("missing key 'fortran_order'");
    if (!have_shape) malformed("missing key 'shape'");
    return header;
  }

 private:
  [[noreturn]] void malformed(const std::string& detail) const {
    fail(path_, "malformed header: " + detail);
  }

  bool at(char c) const { return pos_ < text_.size() && text_[pos_] == c; }

  std::string found() const {
    if (pos_ >= text_.size()) return "end of header";
    return "'" + printable(text_.substr(pos_, 1)) + "'";
  }

  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r' ||
                                   text_[pos_] == '\f' || text_[pos_] == '\v')) {
      ++pos_;
    }
  }

  void expect(char c) {
    if (!at(c)) malformed(std::string("expected '") + c + "', found " + found());
    ++pos_;
  }

  void check_duplicate(bool& seen, const std::string& key) const {
    if (seen) malformed("duplicate key '" + key + "'");
    seen = true;
  }

  /// A '...' or "..." literal at pos_; a backslash takes the next character literally.
  std::string parse_string() {
    const char quote = text_[pos_++];
    std::string out;
    while (pos_ < text_.size() && text_[pos_] != quote) {
      if (text_[pos_] == '\\' && pos_ + 1 < text_.size()) ++pos_;
      out += text_[pos_++];
    }
    if (pos_ >= text_.size()) malformed("unterminated string");
    ++pos_;
    return out;
  }

  void parse_descr_value(Header& header) {
    if (at('\'') || at('"')) {
      header.descr = parse_string();
    } else if (at('[')) {
      // A record dtype: keep its raw text for the error message.
      const std::size_t start = pos_;
      int depth = 0;
      while (pos_ < text_.size()) {
        const char c = text_[pos_];
        if (c == '\'' || c == '"') {
          parse_string();
          continue;
        }
        ++pos_;
        if (c == '[' || c == '(') ++depth;
        if (c == ']' || c == ')') --depth;
        if (depth == 0) break;
      }
      if (depth != 0) malformed("unterminated list in 'descr'");
      header.descr = text_.substr(start, pos_ - start);
      header.structured = true;
    } else {
      malformed("'descr' must be a string, found " + found());
    }
  }

  bool parse_bool() {
    if (text_.compare(pos_, 4, "True") == 0 && !identifier_char(pos_ + 4)) {
      pos_ += 4;
      return true;
    }
    if (text_.compare(pos_, 5, "False") == 0 && !identifier_char(pos_ + 5)) {
      pos_ += 5;
      return false;
    }
    malformed("'fortran_order' must be True or False, found " + found());
  }

  bool identifier_char(std::size_t i) const {
    if (i >= text_.size()) return false;
    const char c = text_[i];
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_';
  }

  [[noreturn]] void not_a_shape() const { not_a_shape(found()); }
  [[noreturn]] void not_a_shape(const std::string& what) const {
    malformed("'shape' must be a tuple of integers, found " + what);
  }

  std::vector<std::int64_t> parse_shape() {
    std::vector<std::int64_t> shape;
    if (!at('(')) not_a_shape();
    ++pos_;
    skip_space();
    if (at(')')) {
      ++pos_;
      return shape;
    }
    for (;;) {
      shape.push_back(parse_int());
      skip_space();
      if (at(',')) {
        ++pos_;
        skip_space();
        if (at(')')) break;
      } else if (at(')')) {
        // "(5)" is an int in Python, not a tuple.
        if (shape.size() == 1) not_a_shape("a parenthesized integer");
        break;
      } else {
        not_a_shape();
      }
    }
    ++pos_;  // ')'
    return shape;
  }

  std::int64_t parse_int() {
    bool negative = false;
    if (at('+') || at('-')) {
      negative = at('-');
      ++pos_;
      skip_space();
    }
    const std::size_t start = pos_;
    std::uint64_t magnitude = 0;
    bool overflow = false;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const auto digit = static_cast<std::uint64_t>(text_[pos_] - '0');
      if (magnitude > (std::uint64_t{1} << 63) / 10 ||
          magnitude * 10 + digit > (std::uint64_t{1} << 63)) {
        overflow = true;
      }
      if (!overflow) magnitude = magnitude * 10 + digit;
      ++pos_;
    }
    if (pos_ == start) not_a_shape();
    const std::string digits = text_.substr(start, pos_ - start);
    if (at('L') || at('l')) ++pos_;  // Python 2 long
    if (identifier_char(pos_)) not_a_shape();
    const auto max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    if (overflow || (!negative && magnitude > max)) {
      fail(path_, "size overflow: dimension " + std::string(negative ? "-" : "") +
                      printable(digits) + " is too large");
    }
    if (negative) {
      // magnitude <= 2^63: -(magnitude - 1) - 1 never overflows.
      return magnitude == 0 ? 0 : -static_cast<std::int64_t>(magnitude - 1) - 1;
    }
    return static_cast<std::int64_t>(magnitude);
  }

  const std::string& text_;
  const std::string& path_;
  std::size_t pos_ = 0;
};

/// Removes the temporary file unless committed.
struct TempFile {
  std::string name;
  std::FILE* file = nullptr;
  bool committed = false;
  TempFile() = default;
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (file != nullptr) std::fclose(file);
    if (!committed && !name.empty()) std::remove(name.c_str());
  }
};

inline std::uint64_t random_suffix() {
  static std::atomic<std::uint64_t> counter{0};
  std::uint64_t seed =
      static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  seed ^= counter.fetch_add(1) * 0x9e3779b97f4a7c15ull;
  try {
    std::random_device device;
    seed ^= (static_cast<std::uint64_t>(device()) << 32) ^ device();
  } catch (...) {
    // clock and counter only
  }
  std::mt19937_64 engine(seed);
  return engine();
}

}  // namespace npy_detail

/// Reads an .npy file (see the file comment for what is supported and the exact messages).
inline NpyArray read_npy(const std::string& path) {
  using namespace npy_detail;
  errno = 0;
  const FilePtr file(std::fopen(path.c_str(), "rb"));
  if (!file) {
    const int error = errno;
    fail(path, "cannot open: " + errno_text(error));
  }

  std::vector<unsigned char> bytes;
  std::uint64_t got = read_up_to(file.get(), path, 8, bytes);
  if (got < 6 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) {
    fail(path, "not an .npy file (bad magic)");
  }
  if (got < 8) fail(path, "truncated preamble: file ends after " + std::to_string(got) + " bytes");
  const unsigned major = bytes[6], minor = bytes[7];
  if ((major != 1 && major != 2 && major != 3) || minor != 0) {
    fail(path, "unsupported .npy version " + std::to_string(major) + "." + std::to_string(minor));
  }
  const std::size_t length_bytes = major == 1 ? 2 : 4;
  got += read_up_to(file.get(), path, length_bytes, bytes);
  if (got < 8 + length_bytes) {
    fail(path, "truncated preamble: file ends after " + std::to_string(got) + " bytes");
  }
  const std::uint64_t header_length = load_le(bytes.data() + 8, length_bytes);

  std::vector<unsigned char> header_bytes;
  got = read_up_to(file.get(), path, header_length, header_bytes);
  if (got < header_length) {
    fail(path, "truncated header: expected " + std::to_string(header_length) + " bytes, got " +
                   std::to_string(got));
  }
  const std::string header_text(header_bytes.begin(), header_bytes.end());
  const Header header = HeaderParser(header_text, path).parse();

  if (header.structured) fail(path, "unsupported structured dtype " + printable(header.descr));
  Dtype dtype;
  if (!parse_descr(header.descr, dtype)) {
    fail(path, "unsupported dtype '" + printable(header.descr) + "'");
  }
  std::uint64_t count = 0;
  switch (element_count(header.shape, count)) {
    case ShapeCheck::negative:
      fail(path, "negative dimension in shape " + shape_repr(header.shape));
    case ShapeCheck::overflow:
      fail(path, "size overflow: shape " + shape_repr(header.shape) + " has too many elements");
    case ShapeCheck::ok:
      break;
  }

  const std::uint64_t data_bytes = count * dtype.size;
  std::vector<unsigned char> raw;
  got = read_up_to(file.get(), path, data_bytes, raw);
  if (got < data_bytes) {
    fail(path, "truncated data: expected " + std::to_string(data_bytes) + " bytes, got " +
                   std::to_string(got));
  }

  NpyArray array;
  array.shape = header.shape;
  array.dtype = header.descr;
  array.fortran_order = header.fortran_order;
  const auto n = static_cast<std::size_t>(count);
  array.data.resize(n);
  const std::size_t rank = header.shape.size();
  if (!header.fortran_order || rank < 2) {
    for (std::size_t i = 0; i < n; ++i) array.data[i] = decode(raw.data() + i * dtype.size, dtype);
  } else if (n > 0) {
    // Walk the C-order multi-index (last axis fastest) and track the Fortran offset.
    std::vector<std::size_t> dims(rank), stride(rank), index(rank, 0);
    for (std::size_t k = 0; k < rank; ++k) {
      dims[k] = static_cast<std::size_t>(header.shape[k]);
      stride[k] = k == 0 ? 1 : stride[k - 1] * dims[k - 1];
    }
    std::size_t offset = 0;
    for (std::size_t i = 0; i < n; ++i) {
      array.data[i] = decode(raw.data() + offset * dtype.size, dtype);
      for (std::size_t k = rank; k-- > 0;) {
        if (++index[k] < dims[k]) {
          offset += stride[k];
          break;
        }
        index[k] = 0;
        offset -= (dims[k] - 1) * stride[k];
      }
    }
  }
  return array;
}

/// Writes `data` (C order, product(shape) doubles) as a '<f8' .npy file, atomically.
inline void write_npy(const std::string& path, const std::vector<std::int64_t>& shape,
                      const double* data) {
  using namespace npy_detail;
  std::uint64_t count = 0;
  switch (element_count(shape, count)) {
    case ShapeCheck::negative:
      fail(path, "cannot write: negative dimension in shape " + shape_repr(shape));
    case ShapeCheck::overflow:
      fail(path, "cannot write: size overflow: shape " + shape_repr(shape) +
                     " has too many elements");
    case ShapeCheck::ok:
      break;
  }
  if (data == nullptr && count > 0) {
    fail(path, "cannot write: null data pointer for " + std::to_string(count) + " elements");
  }

  // The header exactly as numpy 1.24 writes it (numpy/lib/format.py, _write_array_header).
  std::string dict = "{'descr': '<f8', 'fortran_order': False, 'shape': " + shape_repr(shape) + ", }";
  if (!shape.empty()) {
    constexpr std::size_t growth_axis_max_digits = 21;
    const std::size_t digits = std::to_string(shape[0]).size();
    if (digits < growth_axis_max_digits) dict.append(growth_axis_max_digits - digits, ' ');
  }
  const std::size_t hlen = dict.size() + 1;
  unsigned major = 1;
  std::size_t prefix = 10;
  std::size_t padding = 64 - (prefix + hlen) % 64;
  if (hlen + padding > 65535) {
    major = 2;
    prefix = 12;
    padding = 64 - (prefix + hlen) % 64;
  }
  const std::uint64_t header_length = hlen + padding;
  std::string preamble = "\x93NUMPY";
  preamble += static_cast<char>(major);
  preamble += '\0';
  for (std::size_t i = 0; i < prefix - 8; ++i) {
    preamble += static_cast<char>((header_length >> (8 * i)) & 0xffu);
  }
  const std::string head = preamble + dict + std::string(padding, ' ') + "\n";

  TempFile temp;
  for (int attempt = 0; temp.file == nullptr; ++attempt) {
    static const char hex[] = "0123456789abcdef";
    std::string name = path + ".tmp-";
    const std::uint64_t suffix = random_suffix();
    for (int i = 0; i < 16; ++i) name += hex[(suffix >> (4 * i)) & 0xfu];
    errno = 0;
    temp.file = std::fopen(name.c_str(), "wbx");  // "x": fail if it exists, never clobber
    const int error = errno;
    if (temp.file != nullptr) {
      temp.name = name;
    } else if (error != EEXIST || attempt >= 100) {
      fail(path, "cannot write: " + errno_text(error));
    }
  }

  const auto write_or_fail = [&](const void* bytes, std::size_t size) {
    errno = 0;
    if (std::fwrite(bytes, 1, size, temp.file) != size) {
      const int error = errno;
      fail(path, "cannot write: " + errno_text(error));
    }
  };
  write_or_fail(head.data(), head.size());
  constexpr std::size_t block = 8192;
  std::vector<unsigned char> buffer(block * 8);
  for (std::uint64_t start = 0; start < count; start += block) {
    const auto m = static_cast<std::size_t>(std::min<std::uint64_t>(block, count - start));
    for (std::size_t j = 0; j < m; ++j) {
      std::uint64_t bits = 0;
      std::memcpy(&bits, data + start + j, sizeof bits);
      for (std::size_t b = 0; b < 8; ++b) {
        buffer[8 * j + b] = static_cast<unsigned char>((bits >> (8 * b)) & 0xffu);
      }
    }
    write_or_fail(buffer.data(), 8 * m);
  }
  errno = 0;
  std::FILE* file = temp.file;
  temp.file = nullptr;
  if (std::fclose(file) != 0) {
    const int error = errno;
    fail(path, "cannot write: " + errno_text(error));
  }
  errno = 0;
  if (std::rename(temp.name.c_str(), path.c_str()) != 0) {
    const int error = errno;
    fail(path, "cannot write: " + errno_text(error));
  }
  temp.committed = true;
}

}  // namespace moebal_inspect

#ifdef _MSC_VER
#pragma warning(pop)
#endif
