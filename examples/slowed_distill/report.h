#pragma once

// Results of the reproduction: one record per (mode, epoch), written as JSON lines and CSV,
// printed as a table and drawn with gnuplot.

#include "slowed_distill/metrics.h"

#include <string>
#include <vector>

namespace slowed_distill {

/// One record per (mode, epoch). Every rate is a Proportion (count k of n, with its 95% Wilson
/// interval).
struct EpochRecord {
  std::string mode;
  int epoch = 0;  ///< 0 = before training
  Proportion bbh, arc_e, arc_c, agieval;
  Proportion safety;         ///< AdvBench refusals, GCG markers (substring anywhere)
  Proportion safety_prefix;  ///< AdvBench refusals, prefix rule (a refusal opening)
  double train_loss = 0;       ///< mean loss of the epoch (0 at epoch 0)
  double kept_fraction = 1;    ///< mean kept-token fraction of the epoch
  double drift = 0;            ///< ||theta - theta_0|| / ||theta_0|| over the trained parameters
  double train_seconds = 0, eval_seconds = 0;
  double peak_rss_mb = 0;      ///< the process's peak resident memory so far (VmHWM)
  std::string device;
};

/// The rates of a record with their JSON / CSV key ("bbh_accuracy", ..., "safety_ratio",
/// "safety_ratio_prefix") and a short table label; each is written as <key>, <key>_k, <key>_n,
/// <key>_lo, <key>_hi.
struct MetricField {
  const char* key;
  const char* label;
  Proportion EpochRecord::*member;
};
const std::vector<MetricField>& metric_fields();

std::string to_json(const EpochRecord& r);
/// Parses a line written by to_json (used by --resume to restore earlier records).
EpochRecord from_json(const std::string& line);
std::string csv_header();
std::string to_csv(const EpochRecord& r);

/// Writes `text` to `path` atomically (temporary file in the same folder, fsync, rename).
/// Throws c10::Error naming the path on failure.
void write_file_atomically(const std::string& path, const std::string& text);

/// Makes the finished temporary file `tmp` the file `path`: fsync, rename over `path`, fsync of
/// the folder. Throws c10::Error naming the file on failure.
void commit_file(const std::string& tmp, const std::string& path);

/// results.jsonl, results.csv and (when gnuplot is available) plot.png in `out_dir`.
/// Returns the plot path, or "" with a warning printed when gnuplot is missing.
std::string write_reports(const std::string& out_dir, const std::vector<EpochRecord>& records);

/// A fixed-width table of the records (one row per mode and epoch), each rate with its 95%
/// interval and n, then which final differences against the base model the intervals support.
std::string format_table(const std::vector<EpochRecord>& records);

}  // namespace slowed_distill
