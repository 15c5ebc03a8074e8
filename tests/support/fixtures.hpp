// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test support: reads tests/fixtures/switch_aux_loss.txt, written by
// tests/fixtures/generate_fixtures.py with PyTorch autograd (see that script for the format).

#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/types.hpp"

#ifndef MOEBAL_FIXTURE_DIR
#error "MOEBAL_FIXTURE_DIR must name tests/fixtures"
#endif

namespace moebal_test {

struct SwitchFixture {
  std::string name, dtype, convention, score;
  moebal::Index rows = 0, cols = 0, k = 0;
  double coefficient = 1.0;
  bool has_mask = false;
  Eigen::VectorXi mask;
  moebal::RowMatrix<double> logits;  // float cases: the exact float values, widened
  double loss = 0.0;
  Eigen::VectorXd counts, first_counts, f, P;
  moebal::RowMatrix<double> grad;
};

namespace detail {

class TokenReader {
 public:
  explicit TokenReader(const std::string& path) : in_(path) {
    if (!in_) throw std::runtime_error("cannot open fixture file " + path);
  }
  bool next(std::string& token) {
    while (in_ >> token) {
      if (token[0] == '#') {
        std::string rest;
        std::getline(in_, rest);
        continue;
      }
      return true;
    }
    return false;
  }
  std::string word() {
    std::string token;
    if (!next(token)) throw std::runtime_error("fixture file ended early");
    return token;
  }
  void expect(const char* keyword) {
    const std::string token = word();
    if (token != keyword) {
      throw std::runtime_error(std::string("fixture: expected '") + keyword + "', got '" +
                               token + "'");
    }
  }
  // Float cases are written with %.9g: parse them as float so they round-trip exactly.
  double number(bool as_float) { return parse(word(), as_float); }
  static double parse(const std::string& token, bool as_float) {
    if (token == "-inf") return -std::numeric_limits<double>::infinity();
    if (token == "inf") return std::numeric_limits<double>::infinity();
    // strtof/strtod rather than stof/stod: those throw on subnormal values (ERANGE).
    char* end = nullptr;
    const double value = as_float ? static_cast<double>(std::strtof(token.c_str(), &end))
                                  : std::strtod(token.c_str(), &end);
    if (end == token.c_str() || *end != '\0') {
      throw std::runtime_error("fixture: not a number: '" + token + "'");
    }
    return value;
  }
  // The rest of the current line, split into tokens.
  std::vector<std::string> rest_of_line() {
    std::string line;
    std::getline(in_, line);
    std::istringstream split(line);
    std::vector<std::string> tokens;
    std::string token;
    while (split >> token) tokens.push_back(token);
    return tokens;
  }
  long long integer() { return std::stoll(word()); }

 private:
  std::ifstream in_;
};

}  // namespace detail

inline std::vector<SwitchFixture> load_switch_fixtures() {
  detail::TokenReader reader(std::string(MOEBAL_FIXTURE_DIR) + "/switch_aux_loss.txt");
  std::vector<SwitchFixture> cases;
  std::string token;
  while (reader.next(token)) {
    if (token != "case") throw std::runtime_error("fixture: expected 'case', got " + token);
    SwitchFixture c;
    c.name = reader.word();
    reader.expect("dtype");
    c.dtype = reader.word();
    const bool is_float = c.dtype == "float";
    reader.expect("shape");
    c.rows = reader.integer();
    c.cols = reader.integer();
    reader.expect("k");
    c.k = reader.integer();
    reader.expect("convention");
    c.convention = reader.word();
    reader.expect("score");
    c.score = reader.word();
    reader.expect("coefficient");
    c.coefficient = reader.number(false);
    reader.expect("mask");
    c.has_mask = reader.integer() != 0;
    if (c.has_mask) {
      c.mask.resize(c.rows);
      for (moebal::Index t = 0; t < c.rows; ++t) c.mask[t] = static_cast<int>(reader.integer());
    }
    auto read_matrix = [&](moebal::RowMatrix<double>& m) {
      m.resize(c.rows, c.cols);
      for (moebal::Index i = 0; i < c.rows; ++i)
        for (moebal::Index j = 0; j < c.cols; ++j) m(i, j) = reader.number(is_float);
    };
    auto read_vector = [&](Eigen::VectorXd& v, bool numbers_are_float) {
      v.resize(c.cols);
      for (moebal::Index j = 0; j < c.cols; ++j) v[j] = reader.number(numbers_are_float);
    };
    reader.expect("logits");
    read_matrix(c.logits);
    reader.expect("loss");
    c.loss = reader.number(is_float);
    reader.expect("counts");
    read_vector(c.counts, false);
    reader.expect("first_counts");
    read_vector(c.first_counts, false);
    reader.expect("f");
    read_vector(c.f, is_float);
    reader.expect("P");
    read_vector(c.P, is_float);
    reader.expect("grad");
    read_matrix(c.grad);
    reader.expect("end");
    cases.push_back(std::move(c));
  }
  return cases;
}

/// A case of tests/fixtures/loss_family.txt (written by generate_loss_family.py).
struct LossFixture {
  std::string name, kind, dtype, score;
  moebal::Index rows = 0, cols = 0, k = 0;
  double coefficient = 1.0;
  bool has_mask = false;
  Eigen::VectorXi mask;
  std::map<std::string, std::vector<std::string>> params;
  moebal::RowMatrix<double> logits;
  double value = 0.0;
  bool has_closed_form = false;
  double closed_form = 0.0;
  moebal::RowMatrix<double> grad;

  bool is_float() const { return dtype == "float"; }
  const std::string& param(const std::string& key, std::size_t i = 0) const {
    const auto it = params.find(key);
    if (it == params.end() || it->second.size() <= i) {
      throw std::runtime_error("fixture " + name + ": no param " + key);
    }
    return it->second[i];
  }
  bool has(const std::string& key) const { return params.count(key) != 0; }
};

inline std::vector<LossFixture> load_loss_fixtures() {
  detail::TokenReader reader(std::string(MOEBAL_FIXTURE_DIR) + "/loss_family.txt");
  std::vector<LossFixture> cases;
  std::string token;
  while (reader.next(token)) {
    if (token != "case") throw std::runtime_error("fixture: expected 'case', got " + token);
    LossFixture c;
    c.name = reader.word();
    reader.expect("kind");
    c.kind = reader.word();
    reader.expect("dtype");
    c.dtype = reader.word();
    reader.expect("shape");
    c.rows = reader.integer();
    c.cols = reader.integer();
    reader.expect("k");
    c.k = reader.integer();
    reader.expect("score");
    c.score = reader.word();
    reader.expect("coefficient");
    c.coefficient = reader.number(false);
    reader.expect("mask");
    c.has_mask = reader.integer() != 0;
    if (c.has_mask) {
      c.mask.resize(c.rows);
      for (moebal::Index t = 0; t < c.rows; ++t) c.mask[t] = static_cast<int>(reader.integer());
    }
    for (;;) {
      const std::string word = reader.word();
      if (word == "logits") break;
      if (word != "param") throw std::runtime_error("fixture: expected 'param' or 'logits', got " + word);
      const std::string key = reader.word();
      c.params[key] = reader.rest_of_line();
    }
    auto read_matrix = [&](moebal::RowMatrix<double>& m) {
      m.resize(c.rows, c.cols);
      for (moebal::Index i = 0; i < c.rows; ++i)
        for (moebal::Index j = 0; j < c.cols; ++j) m(i, j) = reader.number(c.is_float());
    };
    read_matrix(c.logits);
    reader.expect("value");
    c.value = reader.number(c.is_float());
    std::string next = reader.word();
    if (next == "closed_form") {
      c.has_closed_form = true;
      c.closed_form = reader.number(c.is_float());
      next = reader.word();
    }
    if (next != "grad") throw std::runtime_error("fixture: expected 'grad', got " + next);
    read_matrix(c.grad);
    reader.expect("end");
    cases.push_back(std::move(c));
  }
  return cases;
}

}  // namespace moebal_test
