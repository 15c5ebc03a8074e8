// SPDX-License-Identifier: Apache-2.0
//
// libFuzzer target for moebal-inspect's .npy reader (examples/inspect/npy.hpp).
//
// The reader only reads files (`read_npy(path)`), so the input bytes are written into an
// anonymous in-memory file (memfd_create) and read back through "/proc/self/fd/<fd>": no disk
// I/O, and every fopen starts at offset 0.
//
// Checks (any violation aborts with __builtin_trap after a diagnostic on stderr):
//   - no crash, no sanitizer report, no exception other than moebal_inspect::NpyError;
//   - an NpyError's what() is one printable line "<path>: <problem>", where <problem> starts
//     with one of the problems documented in npy.hpp;
//   - a parsed array: data.size() == product(shape), which fits in the input; and every element
//     equals an independent decoding of the input bytes (own header offset, own byte-order and
//     half-float decoding, own Fortran-to-C index mapping), NaN-aware and bit for bit.

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "npy.hpp"

namespace {

[[noreturn]] void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_npy: CHECK FAILED: %s: %s\n", what, detail.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

struct MemFile {
  int fd = -1;
  std::string path;
  MemFile() {
    fd = static_cast<int>(memfd_create("fuzz_npy", 0));
    if (fd < 0) {
      std::perror("fuzz_npy: memfd_create");
      std::abort();
    }
    path = "/proc/self/fd/" + std::to_string(fd);
  }
  void write(const std::uint8_t* data, std::size_t size) {
    if (ftruncate(fd, 0) != 0) std::abort();
    std::size_t done = 0;
    while (done < size) {
      const ssize_t w = pwrite(fd, data + done, size - done, static_cast<off_t>(done));
      if (w <= 0) std::abort();
      done += static_cast<std::size_t>(w);
    }
  }
};

const char* const kProblems[] = {
    "cannot open: ",
    "cannot read: ",
    "not an .npy file (bad magic)",
    "truncated preamble: file ends after ",
    "unsupported .npy version ",
    "truncated header: expected ",
    "malformed header: ",
    "unsupported dtype '",
    "unsupported structured dtype ",
    "negative dimension in shape (",
    "size overflow: dimension ",
    "size overflow: shape (",
    "truncated data: expected ",
};

void check_error_message(const std::string& path, const std::string& message) {
  const std::string prefix = path + ": ";
  if (message.compare(0, prefix.size(), prefix) != 0) fail("message does not start with the path", message);
  for (const char c : message) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte >= 0x7f) fail("message is not one printable line", message);
  }
  const std::string problem = message.substr(prefix.size());
  for (const char* known : kProblems) {
    if (problem.compare(0, std::strlen(known), known) == 0) return;
  }
  fail("undocumented problem text", message);
}

// ---- An independent decoder, used only to check a successful parse. ----

std::uint64_t le(const std::uint8_t* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t{p[i]} << (8 * i);
  return v;
}

std::uint64_t be(const std::uint8_t* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v = (v << 8) | p[i];
  return v;
}

double half_bits_to_double(std::uint16_t h) {
  const int sign = (h >> 15) & 1, exponent = (h >> 10) & 31, mantissa = h & 1023;
  double magnitude;
  if (exponent == 31) {
    if (mantissa != 0) {
      // NaN with the payload shifted into the double's mantissa, sign kept.
      const std::uint64_t bits = (std::uint64_t(sign) << 63) | (std::uint64_t{0x7ff} << 52) |
                                 (std::uint64_t(mantissa) << 42);
      double v;
      std::memcpy(&v, &bits, sizeof v);
      return v;
    }
    magnitude = INFINITY;
  } else if (exponent == 0) {
    magnitude = mantissa * std::pow(2.0, -24);
  } else {
    magnitude = (1024 + mantissa) * std::pow(2.0, exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

bool host_big_endian() {
  const std::uint32_t probe = 1;
  std::uint8_t first;
  std::memcpy(&first, &probe, 1);
  return first == 0;
}

// Decodes one element given the descr text (already accepted by the reader).
bool decode_independently(const std::string& descr, const std::uint8_t* p, double& out) {
  if (descr.size() < 3) return false;
  const char order = descr[0], kind = descr[1];
  const int size = std::atoi(descr.c_str() + 2);
  const bool big = order == '>' || ((order == '|' || order == '=') && host_big_endian());
  const std::uint64_t bits = big ? be(p, size_t(size)) : le(p, size_t(size));
  switch (kind) {
    case 'f':
      if (size == 2) {
        out = half_bits_to_double(std::uint16_t(bits));
      } else if (size == 4) {
        float f;
        const std::uint32_t b32 = std::uint32_t(bits);
        std::memcpy(&f, &b32, 4);
        out = f;
      } else if (size == 8) {
        std::memcpy(&out, &bits, 8);
      } else {
        return false;
      }
      return true;
    case 'b':
      out = bits != 0 ? 1.0 : 0.0;
      return size == 1;
    case 'i': {
      const int width = 8 * size;
      std::int64_t v;
      if (width == 64) {
        std::memcpy(&v, &bits, 8);
      } else {
        const std::uint64_t sign = std::uint64_t{1} << (width - 1);
        v = static_cast<std::int64_t>(bits ^ sign) - static_cast<std::int64_t>(sign);
      }
      out = static_cast<double>(v);
      return true;
    }
    case 'u':
      out = static_cast<double>(bits);
      return true;
    default:
      return false;
  }
}

bool same_double(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) {
    std::uint64_t x, y;
    std::memcpy(&x, &a, 8);
    std::memcpy(&y, &b, 8);
    return x == y;  // NaN payloads must survive exactly (float16 NaNs are documented to)
  }
  return a == b && std::signbit(a) == std::signbit(b);
}

bool is_float_dtype(const std::string& descr) { return descr.size() >= 2 && descr[1] == 'f'; }

void check_array(const moebal_inspect::NpyArray& array, const std::uint8_t* data, std::size_t size) {
  // Element count.
  unsigned __int128 count = 1;
  for (const std::int64_t d : array.shape) {
    if (d < 0) fail("negative dimension accepted", std::to_string(d));
    count *= static_cast<unsigned __int128>(d);
    if (count > size) count = size + 1;  // saturate: more elements than bytes is impossible
  }
  if (array.data.size() != static_cast<std::size_t>(count)) {
    fail("data size does not match the shape",
         std::to_string(array.data.size()) + " elements for " + std::to_string(array.shape.size()) +
             "-d shape");
  }
  if (size < 10) fail("array parsed from fewer than 10 bytes", std::to_string(size));
  const unsigned major = data[6];
  const std::size_t prefix = major == 1 ? 10 : 12;
  if (size < prefix) fail("array parsed from a truncated preamble", std::to_string(size));
  const std::uint64_t header_length = le(data + 8, prefix - 8);
  const std::uint64_t offset = prefix + header_length;
  const std::size_t element = std::size_t(std::atoi(array.dtype.c_str() + 2));
  if (element == 0) fail("element size 0 for dtype", array.dtype);
  if (offset > size || (size - offset) / element < array.data.size()) {
    fail("array has more elements than the input holds", array.dtype);
  }
  const std::size_t n = array.data.size(), rank = array.shape.size();
  for (std::size_t i = 0; i < n; ++i) {
    // File offset of C-order element i.
    std::size_t file_index = i;
    if (array.fortran_order && rank >= 2) {
      std::size_t rest = i, stride = 1;
      std::vector<std::size_t> index(rank);
      for (std::size_t k = rank; k-- > 0;) {
        const auto d = static_cast<std::size_t>(array.shape[k]);
        index[k] = rest % d;
        rest /= d;
      }
      file_index = 0;
      for (std::size_t k = 0; k < rank; ++k) {
        file_index += index[k] * stride;
        stride *= static_cast<std::size_t>(array.shape[k]);
      }
    }
    double expected = 0.0;
    if (!decode_independently(array.dtype, data + offset + file_index * element, expected)) {
      fail("reader accepted a dtype the oracle does not know", array.dtype);
    }
    const double got = array.data[i];
    const bool ok = is_float_dtype(array.dtype) ? same_double(got, expected) : got == expected;
    if (!ok) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "element %zu of dtype %s: got %.17g, expected %.17g", i,
                    array.dtype.c_str(), got, expected);
      fail("element value differs from an independent decoding", buf);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static MemFile file;
  file.write(data, size);
  try {
    const moebal_inspect::NpyArray array = moebal_inspect::read_npy(file.path);
    check_array(array, data, size);
  } catch (const moebal_inspect::NpyError& error) {
    check_error_message(file.path, error.what());
  } catch (const std::exception& error) {
    fail("exception other than NpyError", error.what());
  } catch (...) {
    fail("non-standard exception", "...");
  }
  return 0;
}
