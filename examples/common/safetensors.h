#pragma once

// A reader for *.safetensors files (8-byte little-endian header length, JSON header, raw
// little-endian data) and for HF checkpoints made of one such file or several shards listed in
// model.safetensors.index.json. Data are memory-mapped; tensor() returns a CPU copy in the
// stored dtype (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL).
//
// Errors are c10::Error naming the file and tensor: missing file, header length past the end of
// the file, invalid header JSON (with byte offset), unknown dtype, data offsets outside the data
// section or not matching dtype x shape, missing tensor.
//
// Example:
//   auto ckpt = slowed_examples::SafetensorsCheckpoint::open("Llama-3.2-1B");  // folder
//   for (const auto& name : ckpt.tensor_names()) { torch::Tensor t = ckpt.tensor(name); }

#include <torch/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace slowed_examples {

struct MappedFile;

struct SafetensorsTensorInfo {
  std::string name;
  std::string dtype;  // as written: "F32", "BF16", ...
  torch::Dtype torch_dtype = torch::kFloat32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets inside the data section
  uint64_t end = 0;
};

/// One .safetensors file.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  /// Names in header order.
  std::vector<std::string> tensor_names() const;
  bool has_tensor(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsTensorInfo& tensor_info(const std::string& name) const;
  /// CPU copy in the stored dtype.
  torch::Tensor tensor(const std::string& name) const;
  /// The "__metadata__" string map (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::string path_;
  std::vector<SafetensorsTensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  uint64_t data_offset_ = 0;
  std::shared_ptr<const MappedFile> mapping_;
};

/// A checkpoint: a folder (model.safetensors.index.json, else model.safetensors, else every
/// *.safetensors in it), an index file, or a single .safetensors file.
class SafetensorsCheckpoint {
 public:
  static SafetensorsCheckpoint open(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> tensor_names() const;
  bool has_tensor(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsTensorInfo& tensor_info(const std::string& name) const;
  torch::Tensor tensor(const std::string& name) const;
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  std::string path_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor name -> file
};

}  // namespace slowed_examples
