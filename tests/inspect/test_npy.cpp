// SPDX-License-Identifier: Apache-2.0
// moebal-inspect's .npy reader/writer (examples/inspect/npy.hpp) against the fixtures of
// tests/fixtures/npy/generate_npy.py. Expected values come from the formulas in that
// script's docstring, not from the files.

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "inspect/npy.hpp"

#ifndef MOEBAL_NPY_DIR
#error "MOEBAL_NPY_DIR must name tests/fixtures/npy"
#endif

namespace {

namespace fs = std::filesystem;
using moebal_inspect::NpyArray;
using moebal_inspect::NpyError;
using moebal_inspect::read_npy;
using moebal_inspect::write_npy;
using Shape = std::vector<std::int64_t>;

std::string fixture(const std::string& name) { return std::string(MOEBAL_NPY_DIR) + "/" + name; }

/// what() of the NpyError `f` throws, or a description of what happened instead.
std::string npy_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const NpyError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<other exception: ") + e.what() + ">";
  }
  return "<no exception>";
}

std::string read_error(const std::string& path) {
  return npy_error([&] { read_npy(path); });
}

std::uint64_t bits_of(double x) {
  std::uint64_t b = 0;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void put_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

/// An .npy file image with `header` padded the way numpy pads it (version 1.0 unless told).
std::string npy_image(const std::string& header, const std::string& data = "",
                      unsigned major = 1) {
  const std::size_t prefix = major == 1 ? 10 : 12;
  const std::size_t hlen = header.size() + 1;
  const std::size_t padding = 64 - (prefix + hlen) % 64;
  const std::size_t length = hlen + padding;
  std::string out = "\x93NUMPY";
  out += static_cast<char>(major);
  out += '\0';
  for (std::size_t i = 0; i < prefix - 8; ++i) out += static_cast<char>((length >> (8 * i)) & 0xff);
  return out + header + std::string(padding, ' ') + "\n" + data;
}

/// Little-endian float32 bytes of `values`.
std::string f4_bytes(const std::vector<float>& values) {
  std::string out;
  for (float v : values) {
    std::uint32_t b = 0;
    std::memcpy(&b, &v, sizeof b);
    for (int i = 0; i < 4; ++i) out += static_cast<char>((b >> (8 * i)) & 0xff);
  }
  return out;
}

/// A fresh directory under the system temp directory, removed with its contents.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device device;
    for (;;) {
      path = fs::temp_directory_path() / ("moebal_npy_test_" + std::to_string(device()));
      if (fs::create_directory(path)) break;
    }
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(path)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }
};

/// The fixtures' (3, 4) array: element i of the C-order flattening is 0.5 * i.
void check_half_3x4(const NpyArray& a) {
  CHECK(a.shape == Shape{3, 4});
  REQUIRE(a.data.size() == 12);
  for (std::size_t i = 0; i < 12; ++i) {
    INFO("i = " << i);
    CHECK(a.data[i] == 0.5 * static_cast<double>(i));
  }
}

}  // namespace

TEST_CASE("float32 C order: element i is 0.5 * i", "[npy]") {
  const NpyArray a = read_npy(fixture("f4_3x4_c.npy"));
  CHECK(a.dtype == "<f4");
  CHECK_FALSE(a.fortran_order);
  check_half_3x4(a);
}

TEST_CASE("Fortran order is transposed to C order", "[npy]") {
  const NpyArray f = read_npy(fixture("f4_3x4_f.npy"));
  CHECK(f.dtype == "<f4");
  CHECK(f.fortran_order);
  check_half_3x4(f);
  CHECK(f.data == read_npy(fixture("f4_3x4_c.npy")).data);

  for (const char* name : {"f8_2x3x4_c.npy", "f8_2x3x4_f.npy"}) {
    INFO(name);
    const NpyArray a = read_npy(fixture(name));
    CHECK(a.dtype == "<f8");
    CHECK(a.fortran_order == (std::string(name) == "f8_2x3x4_f.npy"));
    CHECK(a.shape == Shape{2, 3, 4});
    REQUIRE(a.data.size() == 24);
    std::size_t c = 0;
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 3; ++j) {
        for (int k = 0; k < 4; ++k) CHECK(a.data[c++] == 100 * i + 10 * j + k);
      }
    }
  }

  const NpyArray r4 = read_npy(fixture("f8_2x1x3x2_f.npy"));
  CHECK(r4.fortran_order);
  CHECK(r4.shape == Shape{2, 1, 3, 2});
  REQUIRE(r4.data.size() == 12);
  std::size_t c = 0;
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 3; ++k) {
      for (int l = 0; l < 2; ++l) CHECK(r4.data[c++] == 1000 * i + 10 * k + l);
    }
  }
}

TEST_CASE("big-endian, float16 and float64 equal the float32 values", "[npy]") {
  const std::vector<double> reference = read_npy(fixture("f4_3x4_c.npy")).data;
  const std::vector<std::pair<const char*, const char*>> files = {
      {"f4be_3x4_c.npy", ">f4"}, {"f2_3x4_c.npy", "<f2"}, {"f2be_3x4_c.npy", ">f2"},
      {"f8_3x4_c.npy", "<f8"},   {"f8be_3x4_c.npy", ">f8"}};
  for (const auto& [name, dtype] : files) {
    INFO(name);
    const NpyArray a = read_npy(fixture(name));
    CHECK(a.dtype == dtype);
    CHECK_FALSE(a.fortran_order);
    check_half_3x4(a);
    CHECK(a.data == reference);
  }
  const NpyArray v = read_npy(fixture("f8_5.npy"));
  CHECK(v.shape == Shape{5});
  CHECK(v.data == std::vector<double>{0.0, 0.5, 1.0, 1.5, 2.0});
}

TEST_CASE("float16 special values: signed zero, extremes, subnormals, inf, nan", "[npy]") {
  for (const char* name : {"f2_special.npy", "f2be_special.npy"}) {
    INFO(name);
    const NpyArray a = read_npy(fixture(name));
    CHECK(a.shape == Shape{12});
    REQUIRE(a.data.size() == 12);
    const double inf = std::numeric_limits<double>::infinity();
    const std::vector<double> finite = {0.0,    -0.0,   1.0, -2.0, 65504.0, std::ldexp(1.0, -14),
                                        std::ldexp(1.0, -24), std::ldexp(1023.0, -24)};
    for (std::size_t i = 0; i < finite.size(); ++i) {
      INFO("i = " << i);
      CHECK(bits_of(a.data[i]) == bits_of(finite[i]));  // -0.0 keeps its sign
    }
    CHECK(a.data[8] == inf);
    CHECK(a.data[9] == -inf);
    CHECK(std::isnan(a.data[10]));
    // Half 0x7e00 (quiet nan, payload 0x200) -> double 0x7ff8000000000000, as numpy converts.
    CHECK(bits_of(a.data[10]) == 0x7ff8000000000000ull);
    CHECK(a.data[11] == 0.333251953125);
  }
}

TEST_CASE("version 2.0 and 3.0 files", "[npy]") {
  for (const char* name : {"f4_3x4_v2.npy", "f4_3x4_v3.npy"}) {
    INFO(name);
    const NpyArray a = read_npy(fixture(name));
    CHECK(a.dtype == "<f4");
    check_half_3x4(a);
  }
}

TEST_CASE("0-d and empty arrays, trailing bytes", "[npy]") {
  const NpyArray s = read_npy(fixture("scalar_0d.npy"));
  CHECK(s.shape.empty());
  CHECK(s.dtype == "<f8");
  CHECK(s.data == std::vector<double>{3.25});

  const NpyArray e = read_npy(fixture("empty_0x3.npy"));
  CHECK(e.shape == Shape{0, 3});
  CHECK(e.data.empty());

  // numpy ignores bytes after the data; so does read_npy.
  const NpyArray t = read_npy(fixture("trailing_garbage.npy"));
  check_half_3x4(t);
}

TEST_CASE("bool and integer masks", "[npy]") {
  const NpyArray b = read_npy(fixture("mask_bool.npy"));
  CHECK(b.dtype == "|b1");
  CHECK(b.shape == Shape{3});
  CHECK(b.data == std::vector<double>{1, 0, 1});

  const NpyArray i8 = read_npy(fixture("mask_i8.npy"));
  CHECK(i8.dtype == "<i8");
  CHECK(i8.data == std::vector<double>{1, 0, 0, 1});

  const NpyArray u1 = read_npy(fixture("mask_u1.npy"));
  CHECK(u1.dtype == "|u1");
  CHECK(u1.data == std::vector<double>{0, 1, 1, 0, 1});
}

namespace {
template <class T>
std::vector<double> int_values() {
  using L = std::numeric_limits<T>;
  if (L::is_signed) {
    return {static_cast<double>(L::min()), -1.0, 0.0, 1.0, static_cast<double>(L::max())};
  }
  return {0.0, 1.0, 2.0, static_cast<double>(L::max() - 1), static_cast<double>(L::max())};
}

template <class T>
void check_ints(const std::string& type) {
  const bool one_byte = sizeof(T) == 1;
  std::vector<std::pair<std::string, std::string>> files = {
      {"int_" + type + ".npy", (one_byte ? "|" : "<") + type}};
  if (!one_byte) files.push_back({"int_" + type + "be.npy", ">" + type});
  for (const auto& [name, dtype] : files) {
    INFO(name);
    const NpyArray a = read_npy(fixture(name));
    CHECK(a.dtype == dtype);
    CHECK(a.shape == Shape{5});
    CHECK(a.data == int_values<T>());
  }
}
}  // namespace

TEST_CASE("every integer width, both byte orders", "[npy]") {
  check_ints<std::int8_t>("i1");
  check_ints<std::int16_t>("i2");
  check_ints<std::int32_t>("i4");
  check_ints<std::int64_t>("i8");
  check_ints<std::uint8_t>("u1");
  check_ints<std::uint16_t>("u2");
  check_ints<std::uint32_t>("u4");
  check_ints<std::uint64_t>("u8");
}

TEST_CASE("bad fixture files: exact messages", "[npy]") {
  const std::vector<std::pair<const char*, std::string>> cases = {
      {"not_npy.npy", "not an .npy file (bad magic)"},
      {"empty.npy", "not an .npy file (bad magic)"},
      {"truncated.npy", "truncated data: expected 96 bytes, got 40"},
      {"truncated_header.npy", "truncated header: expected 118 bytes, got 40"},
      {"bad_header.npy", "malformed header: expected '{', found 'g'"},
      {"bad_version.npy", "unsupported .npy version 4.0"},
      {"missing_shape.npy", "malformed header: missing key 'shape'"},
      {"negative_dim.npy", "negative dimension in shape (3, -4)"},
      {"overflow.npy", "size overflow: shape (4294967296, 4294967296) has too many elements"},
      {"complex.npy", "unsupported dtype '<c8'"},
      {"structured.npy", "unsupported structured dtype [('a', '<f4'), ('b', '<i4')]"},
      {"unicode.npy", "unsupported dtype '<U3'"},
  };
  for (const auto& [name, problem] : cases) {
    const std::string path = fixture(name);
    CHECK(read_error(path) == path + ": " + problem);
  }
}

TEST_CASE("missing file and directory", "[npy]") {
  TempDir dir;
  const std::string missing = dir.file("no_such.npy");
  CHECK(read_error(missing) == missing + ": cannot open: " + std::strerror(ENOENT));
  const std::string path = dir.path.string();
  CHECK(read_error(path) == path + ": cannot read: " + std::strerror(EISDIR));
}

TEST_CASE("header parsing is tolerant of layout and strict about content", "[npy]") {
  TempDir dir;
  const std::string path = dir.file("h.npy");
  const std::string data = f4_bytes({0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 2.5f});
  const auto read_header = [&](const std::string& header, const std::string& body) {
    put_bytes(path, npy_image(header, body));
    return read_npy(path);
  };

  SECTION("key order, spacing, quotes, trailing comma, Python 2 longs, version 2.0") {
    for (const std::string header :
         {"{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}",
          "{ \"descr\" :\"<f4\",'fortran_order':False,'shape':(2,3,)\n}",
          "  {'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }  ",
          "{'fortran_order': False,\t'shape': ( 2 , 3 ), 'descr': '<f4', }"}) {
      INFO(header);
      const NpyArray a = read_header(header, data);
      CHECK(a.shape == Shape{2, 3});
      CHECK(a.data == std::vector<double>{0.0, 0.5, 1.0, 1.5, 2.0, 2.5});
    }
    put_bytes(path, npy_image("{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2), }", data, 2));
    const NpyArray f = read_npy(path);
    CHECK(f.shape == Shape{3, 2});
    CHECK(f.data == std::vector<double>{0.0, 1.5, 0.5, 2.0, 1.0, 2.5});
    const NpyArray one = read_header("{'descr': '<f4', 'fortran_order': True, 'shape': (6,), }", data);
    CHECK(one.data == std::vector<double>{0.0, 0.5, 1.0, 1.5, 2.0, 2.5});
    const NpyArray zero = read_header("{'descr': '<f8', 'fortran_order': False, 'shape': (0, 9223372036854775807), }", "");
    CHECK(zero.data.empty());
  }

  SECTION("malformed headers") {
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"", "malformed header: expected '{', found end of header"},
        {"{}", "malformed header: missing key 'descr'"},
        {"{'descr': '<f4', 'shape': (6,)}", "malformed header: missing key 'fortran_order'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'extra': 1}",
         "malformed header: unexpected key 'extra'"},
        {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (6,)}",
         "malformed header: duplicate key 'descr'"},
        {"{descr: '<f4'}", "malformed header: expected a quoted key, found 'd'"},
        {"{'descr' '<f4'}", "malformed header: expected ':', found '''"},
        {"{'descr': '<f4' 'shape': (6,)}", "malformed header: expected ',' or '}', found '''"},
        {"{'descr': '<f4", "malformed header: unterminated string"},
        {"{'descr': 4}", "malformed header: 'descr' must be a string, found '4'"},
        {"{'descr': [('a', '<f4')}", "malformed header: unterminated list in 'descr'"},
        {"{'descr': '<f4', 'fortran_order': false, 'shape': (6,)}",
         "malformed header: 'fortran_order' must be True or False, found 'f'"},
        {"{'descr': '<f4', 'fortran_order': Falsey, 'shape': (6,)}",
         "malformed header: 'fortran_order' must be True or False, found 'F'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': [6]}",
         "malformed header: 'shape' must be a tuple of integers, found '['"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6)}",
         "malformed header: 'shape' must be a tuple of integers, found a parenthesized integer"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3.0)}",
         "malformed header: 'shape' must be a tuple of integers, found '.'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3}",
         "malformed header: 'shape' must be a tuple of integers, found '}'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,)} x",
         "malformed header: unexpected 'x' after '}'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,)}\x01",
         "malformed header: unexpected '\\x01' after '}'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}",
         "size overflow: dimension 99999999999999999999 is too large"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (9223372036854775808,)}",
         "size overflow: dimension 9223372036854775808 is too large"},
        {"{'descr': '<f8', 'fortran_order': False, 'shape': (1152921504606846976,)}",
         "size overflow: shape (1152921504606846976,) has too many elements"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
         "negative dimension in shape (-1,)"},
        {"{'descr': '<f16', 'fortran_order': False, 'shape': (6,)}", "unsupported dtype '<f16'"},
        {"{'descr': '|O', 'fortran_order': False, 'shape': (6,)}", "unsupported dtype '|O'"},
        {"{'descr': '<M8[ns]', 'fortran_order': False, 'shape': (6,)}",
         "unsupported dtype '<M8[ns]'"},
        {"{'descr': '<b2', 'fortran_order': False, 'shape': (6,)}", "unsupported dtype '<b2'"},
        {"{'descr': '\x7f\n', 'fortran_order': False, 'shape': (6,)}",
         "unsupported dtype '\\x7f\\x0a'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (7,)}",
         "truncated data: expected 28 bytes, got 24"},
    };
    for (const auto& [header, problem] : cases) {
      INFO(header);
      put_bytes(path, npy_image(header, data));
      CHECK(read_error(path) == path + ": " + problem);
    }
  }

  SECTION("preamble problems") {
    const std::string good = npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (6,)}", data);
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"\x93NUMP", "not an .npy file (bad magic)"},
        {"\x93NUMPZ\x01\x00", "not an .npy file (bad magic)"},
        {good.substr(0, 7), "truncated preamble: file ends after 7 bytes"},
        {good.substr(0, 9), "truncated preamble: file ends after 9 bytes"},
        {std::string("\x93NUMPY\x02\x00\x10\x00\x00", 11), "truncated preamble: file ends after 11 bytes"},
        {std::string("\x93NUMPY\x01\x01", 8) + good.substr(8), "unsupported .npy version 1.1"},
        {std::string("\x93NUMPY\x00\x00", 8) + good.substr(8), "unsupported .npy version 0.0"},
        // A length field far beyond the file: no huge allocation, just a clean error.
        {std::string("\x93NUMPY\x02\x00\xff\xff\xff\xff{}", 14),
         "truncated header: expected 4294967295 bytes, got 2"},
    };
    for (const auto& [bytes, problem] : cases) {
      put_bytes(path, bytes);
      CHECK(read_error(path) == path + ": " + problem);
    }
  }
}

TEST_CASE("write_npy then read_npy round-trips bit for bit", "[npy]") {
  TempDir dir;
  const double inf = std::numeric_limits<double>::infinity();
  double nan_with_payload = 0.0;
  const std::uint64_t nan_bits = 0xfff0000000012345ull;  // negative signalling-style payload
  std::memcpy(&nan_with_payload, &nan_bits, sizeof nan_with_payload);
  const std::vector<double> specials = {0.0,  -0.0, 1.0 / 3.0, -inf, inf, nan_with_payload,
                                        std::numeric_limits<double>::denorm_min(),
                                        std::numeric_limits<double>::max(),
                                        std::numeric_limits<double>::lowest(), 1e-300, -2.5, 42.0};
  const std::vector<Shape> shapes = {{3, 4}, {2, 3, 2}, {12}, {1, 12, 1}, {}, {0}, {0, 5}, {4, 0, 3}};
  for (const Shape& shape : shapes) {
    std::size_t n = 1;
    for (std::int64_t d : shape) n *= static_cast<std::size_t>(d);
    const std::vector<double> values(specials.begin(), specials.begin() + static_cast<std::ptrdiff_t>(n));
    const std::string path = dir.file("out.npy");
    INFO("rank " << shape.size() << ", " << n << " elements");
    write_npy(path, shape, values.data());
    const NpyArray a = read_npy(path);
    CHECK(a.shape == shape);
    CHECK(a.dtype == "<f8");
    CHECK_FALSE(a.fortran_order);
    REQUIRE(a.data.size() == n);
    for (std::size_t i = 0; i < n; ++i) CHECK(bits_of(a.data[i]) == bits_of(values[i]));
    // The layout numpy uses: data at a multiple of 64, header ends with '\n'.
    const std::string bytes = file_bytes(path);
    REQUIRE(bytes.size() >= 8 * n + 64);
    const std::size_t data_start = bytes.size() - 8 * n;
    CHECK(data_start % 64 == 0);
    CHECK(bytes[data_start - 1] == '\n');
    CHECK(bytes.compare(0, 8, std::string("\x93NUMPY\x01\x00", 8)) == 0);
    CHECK(dir.listing() == std::vector<std::string>{"out.npy"});  // no temporary left
  }
  // null data is fine for an empty array.
  write_npy(dir.file("empty.npy"), {0, 3}, nullptr);
  CHECK(read_npy(dir.file("empty.npy")).shape == Shape{0, 3});
}

TEST_CASE("write_npy writes what np.save writes", "[npy]") {
  // Fixtures written by numpy 1.24.2's np.save (header with numpy's spare spaces).
  TempDir dir;
  std::vector<double> half(12), cube(24);
  for (std::size_t i = 0; i < 12; ++i) half[i] = 0.5 * static_cast<double>(i);
  std::size_t c = 0;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 3; ++j) {
      for (int k = 0; k < 4; ++k) cube[c++] = 100 * i + 10 * j + k;
    }
  }
  const double scalar = 3.25;
  write_npy(dir.file("a.npy"), {3, 4}, half.data());
  write_npy(dir.file("b.npy"), {5}, half.data());
  write_npy(dir.file("c.npy"), {2, 3, 4}, cube.data());
  write_npy(dir.file("d.npy"), {}, &scalar);
  const double seven_and_a_half = 7.5;
  write_npy(dir.file("e.npy"), Shape(16, 1), &seven_and_a_half);
  CHECK(file_bytes(dir.file("a.npy")) == file_bytes(fixture("f8_3x4_c.npy")));
  CHECK(file_bytes(dir.file("b.npy")) == file_bytes(fixture("f8_5.npy")));
  CHECK(file_bytes(dir.file("c.npy")) == file_bytes(fixture("f8_2x3x4_c.npy")));
  CHECK(file_bytes(dir.file("d.npy")) == file_bytes(fixture("scalar_0d.npy")));
  // Here numpy's spare spaces (21 - digits of shape[0]) move the data from byte 128 to 192.
  CHECK(file_bytes(dir.file("e.npy")) == file_bytes(fixture("f8_rank16.npy")));
  CHECK(file_bytes(dir.file("e.npy")).size() == 192 + 8);
}

TEST_CASE("write_npy replaces an existing file and fails cleanly", "[npy]") {
  TempDir dir;
  const double values[] = {1.0, 2.0, 3.0};

  SECTION("overwrite") {
    const std::string path = dir.file("x.npy");
    put_bytes(path, "old contents");
    write_npy(path, {3}, values);
    CHECK(read_npy(path).data == std::vector<double>{1.0, 2.0, 3.0});
    CHECK(dir.listing() == std::vector<std::string>{"x.npy"});
  }

  SECTION("non-existent directory") {
    const std::string path = dir.file("missing/x.npy");
    CHECK(npy_error([&] { write_npy(path, {3}, values); }) ==
          path + ": cannot write: " + std::strerror(ENOENT));
    CHECK_FALSE(fs::exists(path));
    CHECK(dir.listing().empty());
  }

  SECTION("path is a directory: the temporary file is removed") {
    fs::create_directory(dir.path / "sub");
    put_bytes(dir.file("sub/keep"), "x");
    const std::string path = dir.file("sub");
    CHECK(npy_error([&] { write_npy(path, {3}, values); }) ==
          path + ": cannot write: " + std::strerror(EISDIR));
    CHECK(fs::is_directory(path));
    CHECK(dir.listing() == std::vector<std::string>{"sub"});
  }

  SECTION("bad arguments") {
    const std::string path = dir.file("y.npy");
    CHECK(npy_error([&] { write_npy(path, {3, -1}, values); }) ==
          path + ": cannot write: negative dimension in shape (3, -1)");
    CHECK(npy_error([&] { write_npy(path, {4294967296, 4294967296}, values); }) ==
          path + ": cannot write: size overflow: shape (4294967296, 4294967296) has too many elements");
    CHECK(npy_error([&] { write_npy(path, {2, 2}, nullptr); }) ==
          path + ": cannot write: null data pointer for 4 elements");
    CHECK(dir.listing().empty());
  }
}
