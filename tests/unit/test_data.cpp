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
  EXPECT_NE(error_of("a,b\n1,inf\n3,4\n", csv_config({"b"})).find("d.csv:2:3: column 2 (\"b\"): value \"inf\" is not finite"),
            std::string::npos);
  EXPECT_NE(error_of("a,b\n1,1e39\n3,4\n", csv_config({"b"})).find("is not finite in float32"), std::string::npos);
  EXPECT_NE(error_of("a,b\n1,2\n3,4\n", csv_config({"y"})).find("d.csv:1: missing target column \"y\""), std::string::npos);
  EXPECT_NE(error_of("", csv_config({"y"})).find("d.csv: empty file"), std::string::npos);
}

TEST(Csv, NumbersAsUsersWriteThem) {
  // Exponents, signs, integers and spaces around a number (and around a quoted one).
  const auto d = parse_csv("a,b\n1e-3 , -0.5\n  +2,\" 42 \"\n7,-1E2\n", "d.csv", csv_config({"b"}), LossKind::kMse);
  ASSERT_EQ(d.size(), 3);
  EXPECT_FLOAT_EQ(d.x_raw[0][0].item<float>(), 1e-3f);
  EXPECT_FLOAT_EQ(d.x_raw[1][0].item<float>(), 2.f);
  EXPECT_FLOAT_EQ(d.y[0][0].item<float>(), -0.5f);
  EXPECT_FLOAT_EQ(d.y[1][0].item<float>(), 42.f);
  EXPECT_FLOAT_EQ(d.y[2][0].item<float>(), -100.f);
  // Hexadecimal, a lone sign and two signs are not numbers.
  for (const char* bad : {"0x10", "+", "+-1", "1,5", "1.2.3"})
    EXPECT_NE(error_of(std::string("a,b\n1,\"") + bad + "\"\n3,4\n", csv_config({"b"})).find("not a number"), std::string::npos) << bad;
}

TEST(Csv, DelimiterSemicolonAndTab) {
  DataConfig semi = csv_config({"y"});
  semi.delimiter = ";";
  const auto d = parse_csv("\"x\";\"y\"\r\n1;5\r\n3;\"4\"\r\n", "d.csv", semi, LossKind::kMse);
  ASSERT_EQ(d.size(), 2);
  EXPECT_FLOAT_EQ(d.y[1][0].item<float>(), 4.f);
  DataConfig tab = csv_config({"y"});
  tab.delimiter = "\t";
  EXPECT_EQ(parse_csv("x\ty\n1\t5\n3\t4\n", "d.csv", tab, LossKind::kMse).size(), 2);
  // A decimal comma under ";" is a field "1,5", not a number; the message quotes it.
  EXPECT_NE(error_of("x;y\n1,5;2\n3;4\n", semi).find("d.csv:2:1: column 1 (\"x\"): feature column \"x\" is not numeric"), std::string::npos);
  // A file delimited otherwise than data.delimiter says: the header is one column, and the message says which to set.
  EXPECT_NE(error_of("x;y\n1;5\n3;4\n", csv_config({"y"})).find("set data.delimiter to \";\" (it is \",\")"), std::string::npos);
  // Mixed delimiters: a row split by another one is named with the delimiter it holds.
  EXPECT_NE(error_of("x,y\n1,5\n3;4\n", csv_config({"y"})).find("d.csv:3: row has 1 cells, the header has 2 (it holds ';': mixed delimiters?"),
            std::string::npos);
}

TEST(Csv, MissingValuesAreErrorsUnlessRowsAreDropped) {
  // Each spelling of a missing value, in a feature and in the target, is named with its place.
  for (const char* na : {"", "NA", "NaN", "nan", " NA "}) {
    const std::string text = std::string("a,b\n1,2\n") + na + ",4\n5,6\n";
    const std::string e = error_of(text, csv_config({"b"}));
    EXPECT_NE(e.find("d.csv:3:1: column 1 (\"a\"): missing value"), std::string::npos) << na << ": " << e;
    EXPECT_NE(e.find("set data.missing to \"drop_rows\""), std::string::npos) << e;
  }
  EXPECT_NE(error_of("a,b\n1,\n3,4\n", csv_config({"b"})).find("d.csv:2:3: column 2 (\"b\"): missing value"), std::string::npos);
  // drop_rows: the rows go, are counted with their lines, and the remaining rows are the data.
  DataConfig drop = csv_config({"b"}, {"a"});
  drop.missing = "drop_rows";
  const auto d = parse_csv("a,b,unused\n1,2,x\nNA,4,x\n5,6,\n7,nan,x\n9,10,x\n", "d.csv", drop, LossKind::kMse);
  EXPECT_EQ(d.rows_read, 5);
  EXPECT_EQ(d.dropped_lines, (std::vector<size_t>{3, 5}));
  ASSERT_EQ(d.size(), 3);  // a missing value in a column that is not used does not drop its row
  EXPECT_FLOAT_EQ(d.x_raw[1][0].item<float>(), 5.f);
  EXPECT_FLOAT_EQ(d.y[2][0].item<float>(), 10.f);
  // A missing value is not a zero: a row of numbers and missing values never reaches the data.
  EXPECT_NE(error_of("a,b\nNA,1\n1,2\n", drop).find("needs at least 2 data rows, found 1 (1 dropped for missing values)"), std::string::npos);
}

TEST(Csv, NonNumericFeatureColumnSuggestsFeatureColumns) {
  const std::string e = error_of("name,a,b\nalice,1,2\nbob,3,4\n", csv_config({"b"}));
  EXPECT_NE(e.find("d.csv:2:1: column 1 (\"name\"): feature column \"name\" is not numeric (its first non-numeric value: \"alice\"); "
                   "leave it out by listing the features in data.feature_columns, e.g. [\"a\"]"),
            std::string::npos) << e;
  EXPECT_EQ(e.find("bob"), std::string::npos) << "one message per column: " << e;
  EXPECT_EQ(parse_csv("name,a,b\nalice,1,2\nbob,3,4\n", "d.csv", csv_config({"b"}, {"a"}), LossKind::kMse).features(), 1);
}

TEST(Csv, ClassLabelsMapToClassesInSortedOrder) {
  const auto d = parse_csv("x,label\n0.5,0\n1.5,2\n2.5,1\n", "d.csv", csv_config({"label"}), LossKind::kCrossEntropy);
  EXPECT_EQ(d.classes, 3);
  EXPECT_EQ(d.class_labels, (std::vector<int64_t>{0, 1, 2}));
  // 1..5 with gaps and an unsorted file: labels {1, 3, 5} -> classes {0, 1, 2}.
  const auto g = parse_csv("x,label\n0,5\n1,1\n2,3\n3,5\n", "d.csv", csv_config({"label"}), LossKind::kCrossEntropy);
  EXPECT_EQ(g.classes, 3);
  EXPECT_EQ(g.class_labels, (std::vector<int64_t>{1, 3, 5}));
  EXPECT_TRUE(torch::equal(g.y.flatten().to(torch::kLong), torch::tensor({2, 0, 1, 2}, torch::kLong)));
  // {2, 4}, written 2.0 and 4 (whole numbers), and negative labels.
  const auto two = parse_csv("x,label\n0,4\n1,2.0\n", "d.csv", csv_config({"label"}), LossKind::kCrossEntropy);
  EXPECT_EQ(two.class_labels, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(parse_csv("x,label\n0,-1\n1,1\n", "d.csv", csv_config({"label"}), LossKind::kCrossEntropy).class_labels,
            (std::vector<int64_t>{-1, 1}));
  // Labels beyond float32's whole numbers (2^24 + 1 rounds to 2^24 as a float) stay apart.
  const auto big = parse_csv("x,label\n0,16777217\n1,16777216\n", "d.csv", csv_config({"label"}), LossKind::kCrossEntropy);
  EXPECT_EQ(big.class_labels, (std::vector<int64_t>{16777216, 16777217}));
  EXPECT_TRUE(torch::equal(big.y.flatten().to(torch::kLong), torch::tensor({1, 0}, torch::kLong)));
  // data.class_labels fixes the order, and may list a class the file does not hold.
  DataConfig fixed = csv_config({"label"});
  fixed.class_labels = {5, 3, 1, 7};
  const auto f = parse_csv("x,label\n0,5\n1,1\n2,3\n", "d.csv", fixed, LossKind::kCrossEntropy);
  EXPECT_EQ(f.classes, 4);
  EXPECT_TRUE(torch::equal(f.y.flatten().to(torch::kLong), torch::tensor({0, 2, 1}, torch::kLong)));
  EXPECT_NE(error_of("x,label\n0,5\n1,2\n", fixed, LossKind::kCrossEntropy).find("holds the label 2, which data.class_labels does not list (5, 3, 1, 7)"),
            std::string::npos);
  // Labels that are not whole numbers, and a single class.
  EXPECT_NE(error_of("x,label\n0,1\n1,2.5\n", csv_config({"label"}), LossKind::kCrossEntropy)
                .find("d.csv:3:3: column 2 (\"label\"): class label \"2.5\" is not a whole number"),
            std::string::npos);
  EXPECT_NE(error_of("x,label\n0,3\n1,3\n", csv_config({"label"}), LossKind::kCrossEntropy).find("needs at least 2 classes"), std::string::npos);
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
