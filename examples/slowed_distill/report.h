#pragma once

// Results of the reproduction: one record per (mode, epoch), written as JSON lines and CSV,
// printed as a table and drawn with gnuplot.

#include <string>
#include <vector>

namespace slowed_distill {

struct EpochRecord {
  std::string mode;
  int epoch = 0;  ///< 0 = before training
  double bbh_accuracy = 0, arc_e_accuracy = 0, arc_c_accuracy = 0, agieval_accuracy = 0;
  double safety_ratio = 0;
  double train_loss = 0;       ///< mean loss of the epoch (0 at epoch 0)
  double kept_fraction = 1;    ///< mean kept-token fraction of the epoch
  double drift = 0;            ///< ||theta - theta_0|| / ||theta_0|| over all parameters
  double train_seconds = 0, eval_seconds = 0;
  int bbh_n = 0, arc_e_n = 0, arc_c_n = 0, agieval_n = 0, advbench_n = 0;
  std::string device;
};

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

/// A fixed-width table of the records (one row per mode and epoch).
std::string format_table(const std::vector<EpochRecord>& records);

}  // namespace slowed_distill
