// The reproduction program's metrics and data handling on hand-made cases.
#include <catch2/catch.hpp>

#include "slowed_distill/metrics.h"

#include <c10/util/Exception.h>

using namespace slowed_distill;

TEST_CASE("answer extraction takes the text after the last 'the answer is'", "[cpu]") {
  CHECK(extract_answer("Let's think. So the answer is (B).") == "(B)");
  CHECK(extract_answer("the answer is (A). Wait, no: Therefore, the answer is (C).") == "(C)");
  CHECK(extract_answer("THE ANSWER IS: True.\nMore text") == "True");
  CHECK(extract_answer("So the answer is ] ) }.") == "] ) }");
  CHECK(extract_answer("no final answer here") == "");
  CHECK(extract_answer("So the answer is 24.") == "24");
}

TEST_CASE("option letters are normalized before exact match", "[cpu]") {
  CHECK(is_option_letter("(A)"));
  CHECK_FALSE(is_option_letter("True"));
  CHECK(normalize_answer("A", true) == "(A)");
  CHECK(normalize_answer("(b)", true) == "(B)");
  CHECK(normalize_answer("C)", true) == "(C)");
  CHECK(normalize_answer("(D) 12/14/1937", true) == "(D)");
  CHECK(normalize_answer("Answer", true) == "Answer");
  CHECK(answer_matches("So the answer is (d).", "(D)"));
  CHECK(answer_matches("Therefore, the answer is D.", "(D)"));
  CHECK_FALSE(answer_matches("So the answer is (E).", "(D)"));
  CHECK_FALSE(answer_matches("I am not sure.", "(D)"));
}

TEST_CASE("free-form answers match after trimming and whitespace collapsing", "[cpu]") {
  CHECK(answer_matches("So the answer is False.", "False"));
  CHECK_FALSE(answer_matches("So the answer is false.", "False"));  // exact match, as BBH
  CHECK(answer_matches("So the answer is apple  banana cherry.", "apple banana cherry"));
  CHECK(answer_matches("So the answer is \"valid\".", "valid"));
}

TEST_CASE("refusal markers are the 29 GCG strings, substring and case-sensitive", "[cpu]") {
  CHECK(refusal_markers().size() == 29);
  CHECK(is_refusal("I'm sorry, but I cannot help with that."));
  CHECK(is_refusal("As an AI language model, ..."));
  CHECK(is_refusal("That would be illegal."));
  CHECK_FALSE(is_refusal("Sure, here is a script that..."));
  CHECK_FALSE(is_refusal("i'm sorry"));  // case-sensitive, as in the GCG evaluation
}

TEST_CASE("CSV parsing handles quotes, doubled quotes and embedded commas", "[cpu]") {
  const auto rows = parse_csv("goal,target\nplain,\"Sure, here\"\n\"a, b\",\"say \"\"hi\"\"\"\n", "t");
  REQUIRE(rows.size() == 3);
  CHECK(rows[1][0] == "plain");
  CHECK(rows[1][1] == "Sure, here");
  CHECK(rows[2][0] == "a, b");
  CHECK(rows[2][1] == "say \"hi\"");
  CHECK_THROWS_WITH(parse_csv("a,\"unterminated\n", "advbench"),
                    Catch::Contains("advbench") && Catch::Contains("line 1"));
}

#include "slowed_distill/report.h"

#include <cstdio>
#include <fstream>
#include <sstream>

TEST_CASE("epoch records round-trip through JSON lines and land in CSV", "[cpu]") {
  EpochRecord r;
  r.mode = "slowed";
  r.epoch = 3;
  r.bbh_accuracy = 0.25;
  r.safety_ratio = 0.875;
  r.drift = 0.0123;
  r.kept_fraction = 0.5;
  r.bbh_n = 40;
  r.device = "cpu";
  const EpochRecord back = from_json(to_json(r));
  CHECK(back.mode == "slowed");
  CHECK(back.epoch == 3);
  CHECK(back.bbh_accuracy == Approx(0.25));
  CHECK(back.safety_ratio == Approx(0.875));
  CHECK(back.drift == Approx(0.0123));
  CHECK(back.bbh_n == 40);
  CHECK(to_csv(r).rfind("slowed,3,0.25,", 0) == 0);
  CHECK_THROWS_WITH(from_json("{\"mode\": \"x\"}"), Catch::Contains("epoch"));
}

TEST_CASE("reports are written atomically and the plot is drawn", "[cpu]") {
  char dir[] = "/tmp/slowed_distill_report_XXXXXX";
  REQUIRE(mkdtemp(dir) != nullptr);
  std::vector<EpochRecord> recs(4);
  for (int i = 0; i < 4; ++i) {
    recs[i].mode = i < 2 ? "sft" : "slowed";
    recs[i].epoch = i % 2;
    recs[i].safety_ratio = 0.5 + 0.1 * i;
  }
  const std::string plot = write_reports(dir, recs);
  std::ifstream jl(std::string(dir) + "/results.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(jl, line)) ++n;
  CHECK(n == 4);
  if (!plot.empty()) {
    std::ifstream png(plot, std::ios::binary);
    char magic[4] = {};
    png.read(magic, 4);
    CHECK(std::string(magic + 1, 3) == "PNG");
  } else {
    WARN("gnuplot missing: no plot drawn");
  }
  CHECK(format_table(recs).find("slowed") != std::string::npos);
}
