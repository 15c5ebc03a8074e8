// SPDX-License-Identifier: Apache-2.0
// moebal-inspect end to end: the tool runs on .npy files, its JSON agrees with the library and
// with the PyTorch fixtures, every option is exercised, every bad input gives a one-line error
// naming the file and exit status 2, and no partial output file is left.

#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "inspect/npy.hpp"
#include "moebal/moebal.hpp"
#include "support/fixtures.hpp"
#include "support/random.hpp"

#ifndef MOEBAL_INSPECT_EXE
#error "MOEBAL_INSPECT_EXE must name the moebal-inspect executable"
#endif

using moebal::Index;
using moebal::RowMatrix;

namespace {

struct Run {
  int status = -1;
  std::string out, err;
};

std::string temp_dir() {
  static const std::string dir = [] {
    char pattern[] = "/tmp/moebal-inspect-test-XXXXXX";
    const char* made = mkdtemp(pattern);
    if (made == nullptr) throw std::runtime_error("mkdtemp failed");
    return std::string(made);
  }();
  return dir;
}

Run run(const std::string& args) {
  const std::string err_path = temp_dir() + "/stderr.txt";
  const std::string command = std::string(MOEBAL_INSPECT_EXE) + " " + args + " 2> " + err_path;
  Run r;
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buffer[4096];
  std::size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) r.out.append(buffer, n);
  const int status = pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream err(err_path);
  std::stringstream ss;
  ss << err.rdbuf();
  r.err = ss.str();
  return r;
}

std::string save(const std::string& name, const RowMatrix<double>& m) {
  const std::string path = temp_dir() + "/" + name;
  moebal_inspect::write_npy(path, {m.rows(), m.cols()}, m.data());
  return path;
}

bool exists(const std::string& path) { return std::ifstream(path).good(); }

}  // namespace

TEST_CASE("moebal-inspect: JSON agrees with the PyTorch fixtures and the library", "[inspect]") {
  const auto cases = moebal_test::load_switch_fixtures();
  int checked = 0;
  for (const auto& c : cases) {
    if (c.dtype != "double" || c.has_mask || c.rows < 7) continue;
    INFO("fixture " << c.name);
    const std::string conv = c.convention == "huggingface" ? "hf"
                             : c.convention == "first_choice" ? "first-choice" : "megatron";
    const std::string logits = save("logits.npy", c.logits);
    const std::string grad = temp_dir() + "/grad.npy";
    std::remove(grad.c_str());
    std::ostringstream coeff;
    coeff.precision(17);
    coeff << c.coefficient;
    const Run r = run(logits + " --json --k " + std::to_string(c.k) + " --convention " + conv +
                      " --score " + c.score + " --coeff " + coeff.str() + " --grad-of switch --grad-out " + grad);
    REQUIRE(r.status == 0);
    const auto j = nlohmann::json::parse(r.out);
    CHECK(j["losses"]["switch"].get<double>() == Approx(c.loss).epsilon(1e-12));
    CHECK(j["tokens"].get<Index>() == c.rows);
    CHECK(j["experts"].get<Index>() == c.cols);
    for (Index i = 0; i < c.cols; ++i) CHECK(j["tokens_per_expert"][std::size_t(i)].get<double>() == c.counts[i]);
    const auto g = moebal_inspect::read_npy(grad);
    REQUIRE(g.shape == std::vector<std::int64_t>{c.rows, c.cols});
    for (Index i = 0; i < c.grad.size(); ++i) {
      CHECK(g.data[std::size_t(i)] == Approx(c.grad.data()[i]).margin(1e-14).epsilon(1e-10));
    }
    ++checked;
  }
  CHECK(checked >= 5);
}

TEST_CASE("moebal-inspect: every option", "[inspect]") {
  const RowMatrix<double> x = moebal_test::random_logits(24, 6, 1.0, 5);
  const std::string logits = save("x.npy", x);

  SECTION("human report: header, bar chart, metrics and the table of conventions") {
    const Run r = run(logits);
    REQUIRE(r.status == 0);
    CHECK(r.out.find("N = 6 experts, k = 2, convention megatron") != std::string::npos);
    CHECK(r.out.find("expert   5") != std::string::npos);
    CHECK(r.out.find("Metrics: MaxVio") != std::string::npos);
    CHECK(r.out.find("first-choice") != std::string::npos);
    CHECK(r.out.find("#") != std::string::npos);
  }
  SECTION("mask, seq-len, layout, sigmoid, z / seq / cv2 gradients") {
    Eigen::VectorXd mask = Eigen::VectorXd::Ones(24);
    mask[3] = 0;
    const std::string mask_path = temp_dir() + "/mask.npy";
    moebal_inspect::write_npy(mask_path, {24}, mask.data());
    for (const std::string layout : {"batch-major", "seq-major"}) {
      const std::string grad = temp_dir() + "/g.npy";
      const Run r = run(logits + " --json --mask " + mask_path + " --seq-len 4 --layout " + layout +
                        " --score sigmoid --k 3 --grad-of seq --grad-out " + grad);
      REQUIRE(r.status == 0);
      const auto j = nlohmann::json::parse(r.out);
      Eigen::VectorXi m = Eigen::VectorXi::Ones(24);
      m[3] = 0;
      moebal::SequenceOptions o;
      o.score = moebal::ScoreFunction::sigmoid;
      o.mask = moebal::TokenMask(m);
      const auto layout_value = layout == "seq-major" ? moebal::SequenceLayout::sequence_major(4)
                                                      : moebal::SequenceLayout::batch_major(4);
      const auto seq = moebal::sequence_aux_loss(x, 3, layout_value, o);
      CHECK(j["losses"]["seq"].get<double>() == Approx(seq.loss).epsilon(1e-13));
      CHECK(j["tokens"].get<Index>() == 23);
      const auto g = moebal_inspect::read_npy(grad);
      CHECK(g.data[3 * 6 + 1] == 0.0);  // padded row
      CHECK(g.data[0] == Approx(seq.grad(0, 0)).epsilon(1e-12));
    }
    for (const std::string which : {"z", "cv2-importance"}) {
      const std::string grad = temp_dir() + "/g2.npy";
      REQUIRE(run(logits + " --grad-of " + which + " --grad-out " + grad).status == 0);
      const auto g = moebal_inspect::read_npy(grad);
      const RowMatrix<double> expected = which == "z" ? moebal::z_loss(x).grad
                                                      : moebal::cv2_importance_loss(x, 2).grad;
      CHECK(g.data[7] == Approx(expected.data()[7]).epsilon(1e-12));
    }
  }
  SECTION("[L, T, N] with --layers, and [B, S, N] giving the sequence length") {
    RowMatrix<double> stacked(48, 6);
    stacked << x, moebal_test::random_logits(24, 6, 2.0, 6);
    const std::string path = temp_dir() + "/layers.npy";
    moebal_inspect::write_npy(path, {2, 24, 6}, stacked.data());
    for (const std::string agg : {"sum", "mean", "pooled"}) {
      const Run r = run(path + " --json --layers " + agg);
      REQUIRE(r.status == 0);
      const auto j = nlohmann::json::parse(r.out);
      std::vector<RowMatrix<double>> layers = {stacked.topRows(24), stacked.bottomRows(24)};
      moebal::SwitchOptions o;
      const auto mode = agg == "sum" ? moebal::LayerAggregation::sum
                        : agg == "mean" ? moebal::LayerAggregation::mean : moebal::LayerAggregation::pooled;
      CHECK(j["losses"]["switch"].get<double>() ==
            Approx(moebal::switch_aux_loss_layers(layers, 2, o, mode).loss).epsilon(1e-13));
    }
    const Run bsn = run(path + " --json");  // [B = 2, S = 24, N]: S = 24
    REQUIRE(bsn.status == 0);
    CHECK(nlohmann::json::parse(bsn.out)["losses"].contains("seq"));
  }
}

TEST_CASE("moebal-inspect: bad input gives one line and status 2", "[inspect][errors]") {
  const RowMatrix<double> x = moebal_test::random_logits(8, 4, 1.0, 7);
  const std::string logits = save("ok.npy", x);
  auto expect_error = [](const Run& r, const std::string& text) {
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    CHECK(r.err.find(text) != std::string::npos);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(r.out.empty());
  };
  const std::string text_file = temp_dir() + "/not.npy";
  std::ofstream(text_file) << "hello";
  expect_error(run(text_file), text_file + ": ");
  expect_error(run(temp_dir() + "/missing.npy"), "missing.npy");
  const std::string npy_dir = MOEBAL_NPY_DIR;
  expect_error(run(npy_dir + "/truncated.npy"), "truncated.npy: truncated data");
  expect_error(run(npy_dir + "/complex.npy"), "complex.npy: unsupported dtype '<c8'");
  RowMatrix<double> nan = x;
  nan(2, 1) = std::nan("");
  expect_error(run(save("nan.npy", nan)), "nan.npy: NaN at row 2, column 1");
  const std::string mask_path = temp_dir() + "/short_mask.npy";
  const double ones[3] = {1, 1, 1};
  moebal_inspect::write_npy(mask_path, {3}, ones);
  expect_error(run(logits + " --mask " + mask_path), "short_mask.npy: expected one mask element per token (8), got 3");
  expect_error(run(logits + " --k 9"), "ok.npy: moebal::switch_aux_loss: argument 'k'");
  const std::string cube = temp_dir() + "/rank4.npy";
  const double values[16] = {};
  moebal_inspect::write_npy(cube, {2, 2, 2, 2}, values);
  expect_error(run(cube), "rank4.npy: expected shape [T, N], [B, S, N] or [L, T, N]");
  // Unwritable output path: an error, and no partial file.
  const std::string bad_out = temp_dir() + "/no/such/dir/grad.npy";
  expect_error(run(logits + " --grad-of switch --grad-out " + bad_out), "grad.npy");
  CHECK_FALSE(exists(bad_out));
  expect_error(run(logits + " --grad-of switch"), "--grad-of and --grad-out go together");
  expect_error(run(logits + " --convention nope"), "moebal-inspect: ");
}

TEST_CASE("moebal-inspect: numpy's Fortran-order, big-endian and float16 files give the same report",
          "[inspect]") {
  // tests/fixtures/npy/*_3x4_*: the same [3, 4] values 0.5 i written by numpy in each layout.
  const std::string dir = MOEBAL_NPY_DIR;
  const Run reference = run(dir + "/f8_3x4_c.npy --json --k 1");
  REQUIRE(reference.status == 0);
  const auto expected = nlohmann::json::parse(reference.out);
  for (const char* file : {"f4_3x4_c.npy", "f4_3x4_f.npy", "f4be_3x4_c.npy", "f8be_3x4_c.npy",
                           "f2_3x4_c.npy", "f2be_3x4_c.npy", "f4_3x4_v2.npy", "f4_3x4_v3.npy"}) {
    INFO(file);
    const Run r = run(dir + "/" + file + " --json --k 1");
    REQUIRE(r.status == 0);
    const auto j = nlohmann::json::parse(r.out);
    CHECK(j["losses"]["switch"].get<double>() == Approx(expected["losses"]["switch"].get<double>()).epsilon(1e-12));
    CHECK(j["tokens_per_expert"] == expected["tokens_per_expert"]);
  }
  // A gradient written for a Fortran-order input has the input's shape (C order, float64).
  const std::string grad = temp_dir() + "/fortran_grad.npy";
  REQUIRE(run(dir + "/f4_3x4_f.npy --k 1 --grad-of z --grad-out " + grad).status == 0);
  CHECK(moebal_inspect::read_npy(grad).shape == std::vector<std::int64_t>{3, 4});
}
