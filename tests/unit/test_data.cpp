// Data: the CSV reader's columns, errors (file:line:column) and standardization; the generator.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "bnlab/errors.hpp"
#include "data.hpp"

namespace {

using namespace bnlab;

DataConfig csv_config(std::vector<std::string> targets, std::vector<std::string> features = {}) {
  DataConfig d;
  d.source = "csv";
  d.target_columns = std::move(targets);
  d.feature_columns = std::move(features);
  return d;
}

std::string error_of(const std::string& text, const DataConfig& d, LossKind loss = LossKind::kMse) {
  try {
    parse_csv(text, "d.csv", d, loss);
  } catch (const InputError& e) {
    std::string all;
    for (const auto& p : e.problems()) all += p + "\n";
    return all;
  }
  ADD_FAILURE() << "accepted: " << text;
  return "";
}

TEST(Csv, ColumnsByNameAndStandardization) {
  // Features a, c (b is the target). a = [1, 3] -> mean 2, std (unbiased) sqrt(2);
  // c = [10, 10] -> std 0, kept as 1 so the column becomes 0 rather than NaN.
  const auto d = parse_csv("a, b ,c\n1,5,10\n\n3,7,10\n", "d.csv", csv_config({"b"}), LossKind::kMse);
  EXPECT_EQ(d.feature_names, (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(d.size(), 2);
  EXPECT_FLOAT_EQ(d.y[0][0].item<float>(), 5.f);
  EXPECT_FLOAT_EQ(d.x_mean[0].item<float>(), 2.f);
  EXPECT_FLOAT_EQ(d.x_std[0].item<float>(), std::sqrt(2.f));
  EXPECT_FLOAT_EQ(d.x_std[1].item<float>(), 1.f);
  EXPECT_FLOAT_EQ(d.x[0][0].item<float>(), -1.f / std::sqrt(2.f));
  EXPECT_FLOAT_EQ(d.x[1][1].item<float>(), 0.f);
  const auto picked = parse_csv("a,b,c\n1,5,10\n3,7,11\n", "d.csv", csv_config({"a"}, {"c"}), LossKind::kMse);
  EXPECT_EQ(picked.features(), 1);
}

TEST(Csv, ErrorsNameFileLineAndColumn) {
  EXPECT_NE(error_of("a,b\n1,2\n3\n", csv_config({"b"})).find("d.csv:3: row has 1 cells, the header has 2"), std::string::npos);
  EXPECT_NE(error_of("a,b\n1,2\n3,x7\n", csv_config({"b"})).find("d.csv:3:3: column 2 (\"b\"): not a number: \"x7\""),
            std::string::npos);
  EXPECT_NE(error_of("a,b\n1,nan\n3,4\n", csv_config({"b"})).find("d.csv:2:3: column 2 (\"b\"): value \"nan\" is not finite"),
            std::string::npos);
  EXPECT_NE(error_of("a,b\n1,inf\n3,4\n", csv_config({"b"})).find("is not finite"), std::string::npos);
  EXPECT_NE(error_of("a,b\n1,2\n3,4\n", csv_config({"y"})).find("d.csv:1: missing target column \"y\""), std::string::npos);
  EXPECT_NE(error_of("", csv_config({"y"})).find("d.csv: empty file"), std::string::npos);
  EXPECT_NE(error_of("a,b\n1,2.5\n3,0\n", csv_config({"b"}), LossKind::kCrossEntropy).find("whole, non-negative class labels"),
            std::string::npos);
}

TEST(Csv, ClassLabelsCountClasses) {
  const auto d = parse_csv("x,label\n0.5,0\n1.5,2\n2.5,1\n", "d.csv", csv_config({"label"}), LossKind::kCrossEntropy);
  EXPECT_EQ(d.classes, 3);
}

TEST(Synthetic, SeededAndShaped) {
  DataConfig d;
  d.samples = 500;
  d.features = 3;
  d.targets = 2;
  const auto a = make_synthetic(d, LossKind::kGaussianNll, 5);
  const auto b = make_synthetic(d, LossKind::kGaussianNll, 5);
  const auto c = make_synthetic(d, LossKind::kGaussianNll, 6);
  EXPECT_EQ(a.x.sizes().vec(), (std::vector<int64_t>{500, 3}));
  EXPECT_EQ(a.y.sizes().vec(), (std::vector<int64_t>{500, 2}));
  EXPECT_TRUE(torch::equal(a.x, b.x) && torch::equal(a.y, b.y));
  EXPECT_FALSE(torch::equal(a.y, c.y));
  // Standardized features: mean 0, std 1 (to float rounding).
  EXPECT_LT(a.x.mean(0).abs().max().item<float>(), 1e-5f);
  EXPECT_LT((a.x.std(0) - 1).abs().max().item<float>(), 1e-5f);
  // Targets scale with `scale`: the default 5e-4 keeps them within a few 1e-3.
  EXPECT_LT(a.y.abs().max().item<float>(), 0.01f);
  const auto cls = make_synthetic(d, LossKind::kCrossEntropy, 5);
  EXPECT_EQ(cls.classes, 3);
  EXPECT_EQ(cls.y.max().item<float>(), 2.f);
}

}  // namespace
