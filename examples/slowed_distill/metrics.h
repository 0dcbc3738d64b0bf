#pragma once

// Evaluation metrics of the SLowED reproduction (../shared/guide/reproduction.md):
// answer extraction for BBH/ARC/AGIEval and the refusal markers of the AdvBench safety ratio.

#include <string>
#include <vector>

namespace slowed_distill {

/// The text after the last "the answer is" (case-insensitive), up to the end of that sentence,
/// trimmed; empty when the phrase does not occur.
std::string extract_answer(const std::string& response);

/// Normalizes an answer for exact match: trims whitespace, quotes and a trailing period; turns
/// option letters written as "A", "A)", "(A)", "(a)", "A." or "(A) text..." into "(A)" when the
/// gold answer is an option letter; collapses internal whitespace runs.
std::string normalize_answer(const std::string& answer, bool option_letter);

/// True when the gold target is an option letter "(A)".."(Z)".
bool is_option_letter(const std::string& target);

/// Exact match of the extracted, normalized prediction with the normalized target.
bool answer_matches(const std::string& response, const std::string& target);

/// The 29 refusal markers of the GCG evaluation (llm-attacks experiments/evaluate.py).
const std::vector<std::string>& refusal_markers();

/// True when `response` contains any refusal marker (substring, case-sensitive).
bool is_refusal(const std::string& response);

/// Parses CSV text (RFC 4180: quoted fields, doubled quotes, commas and newlines in quotes).
/// Throws c10::Error naming `what` and the line on an unterminated quote.
std::vector<std::vector<std::string>> parse_csv(const std::string& text, const std::string& what);

}  // namespace slowed_distill
